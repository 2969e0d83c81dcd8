"""sdec check and sdec fmt, in process through sdec.cli.main (plus one real subprocess)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import sdec
from sdec.cli import main

REPO = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in (REPO / "specs").glob("*.sde"))

BAD = """sde bad
state x, v
init v ~ normal(0, 0.01)
beta(t) = 0.1 + 9.9 * t
T = 1
target normal(0, I)
Q = [[0, -1], [1, 0]]
D = [[1/2, 0], [0, -1/2]]
"""


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("name", SHIPPED)
def test_check_every_shipped_spec(capsys, name):
    code, out, err = run(capsys, "check", f"specs/{name}.sde")
    assert code == 0 and (err == "") == (name != "alda")  # alda's not-mixed warning is on stderr
    assert out.startswith(f"specs/{name}.sde: sde {name} (recipe form)")
    assert "proofs:" in out and "FAILED" not in out
    last = [ln for ln in out.rstrip().split("\n") if not ln.startswith("      warnings")][-2:]
    assert last[0].startswith("OK: every proof holds")
    assert last[1] == (f"next: `sdec compile specs/{name}.sde -o MODULE.py` writes the torch module, "
                       f"`sdec verify specs/{name}.sde` tests its kernels, `sdec train specs/{name}.sde` trains a model on it")


def test_alda_warns_and_still_passes(capsys):
    code, out, err = run(capsys, "check", "specs/alda.sde")
    assert code == 0
    assert "[WARNING] mixed by T = 1" in out and "warning:" not in out  # the report on stdout
    lines = err.split("\n")  # the diagnostics on stderr
    i = lines.index(next(line for line in lines if line.startswith("specs/alda.sde:14:5: warning: the process has NOT")))
    assert lines[i + 1] == "    T = 1" and lines[i + 2] == "        ^"
    assert "OK: every proof holds (1 warning(s))\n      warnings do not stop compilation" in out


def test_mix_tol_option(capsys):
    code, out, _ = run(capsys, "check", "--mix-tol", "1", "specs/alda.sde")
    assert code == 0 and "WARNING" not in out and "(0 warning(s))" in out


@pytest.mark.parametrize("name", SHIPPED)
def test_check_json(capsys, name):
    code, out, _ = run(capsys, "check", "--json", f"specs/{name}.sde")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True
    assert doc["spec"]["name"] == name and doc["spec"]["K"] == len(doc["spec"]["variables"])
    verdicts = {p["name"]: p["verdict"] for p in doc["proofs"]}
    assert "failed" not in verdicts.values()
    assert verdicts["N(0, Σ∞) is stationary (F Σ∞ + Σ∞ Fᵀ + G Gᵀ = 0)"] == "proved"
    eig = next(p for p in doc["proofs"] if p["name"].startswith("eigenvalues"))
    assert len(eig["data"]["eigenvalues"]) == doc["spec"]["K"]
    warnings = [d for d in doc["diagnostics"] if d["severity"] == "warning"]
    assert bool(warnings) == (name == "alda")


def test_check_json_of_a_failing_spec(capsys, tmp_path):
    (tmp_path / "bad.sde").write_text(BAD)
    code, out, _ = run(capsys, "check", "--json", str(tmp_path / "bad.sde"))
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    (error,) = [d for d in doc["diagnostics"] if d["severity"] == "error"]
    assert (error["line"], error["column"], error["message"]) == (8, 5, "D is not positive semi-definite (eigenvalue -0.5)")
    assert any(p["verdict"] == "failed" for p in doc["proofs"])


def test_bad_spec_exits_1_with_a_located_error_and_caret(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.sde").write_text(BAD)
    code, out, err = run(capsys, "check", "bad.sde")
    assert code == 1 and "error:" not in out
    lines = err.split("\n")
    i = lines.index("bad.sde:8:5: error: D is not positive semi-definite (eigenvalue -0.5)")
    assert lines[i + 1] == "    D = [[1/2, 0], [0, -1/2]]"
    assert lines[i + 2] == "        ^~~~~~~~~~~~~~~~~~~~~"
    assert out.rstrip().split("\n")[-2:] == [
        "FAILED: 1 error(s), 0 warning(s)",
        "next: fix the errors (on stderr, each at file:line:column), then run `sdec check bad.sde` again"]


def test_syntax_errors_exit_1_and_are_all_listed(capsys, tmp_path):
    path = tmp_path / "syntax.sde"
    path.write_text("sde s\nconst a = $\nstate x y\n")
    code, out, err = run(capsys, "check", str(path))
    assert code == 1
    assert f"{path}:2:11: error: unexpected character '$'" in err
    assert f"{path}:3:9: error: unexpected 'y'" in err
    assert "FAILED: 2 error(s)" in out


@pytest.mark.parametrize("content", [b"", b"\x00\x01\xff garbage", bytes(range(256)), b"sde s\nstate x, v\nQ = [[0,",
                                     b"sde s\nconst a = " + b"(" * 200 + b"1" + b")" * 200])
def test_hostile_files_exit_1_without_traceback(capsys, tmp_path, content):
    path = tmp_path / "hostile.sde"
    path.write_bytes(content)
    code, out, err = run(capsys, "check", str(path))
    assert code == 1 and "error:" in out + err


def test_singular_target_reports_without_traceback(capsys, tmp_path):
    path = tmp_path / "singular.sde"
    path.write_text(BAD.replace("normal(0, I)", "normal(0, diag(1, 0))").replace("-1/2]]", "1/2]]"))
    code, out, err = run(capsys, "check", str(path))
    assert code == 1 and "The target covariance Σ∞ is not positive definite (eigenvalue 0)" in err
    assert "F(t) =" not in out  # F = -beta (Q + D) Σ∞⁻¹ does not exist


def test_missing_file_and_directory(capsys, tmp_path):
    code, out, err = run(capsys, "check", str(tmp_path / "nope.sde"))
    assert code == 1 and out == "" and err.strip() == f"error: {tmp_path / 'nope.sde'}: no such file"
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 1 and "is a directory" in err


@pytest.mark.parametrize("name", SHIPPED)
def test_fmt_output_reparses_to_the_same_ir(capsys, name):
    code, out, err = run(capsys, "fmt", f"specs/{name}.sde")
    assert code == 0 and err == ""
    assert sdec.parse(out, "formatted.sde") == sdec.parse_file(f"specs/{name}.sde")


def test_fmt_of_a_bad_spec(capsys, tmp_path):
    (tmp_path / "bad.sde").write_text(BAD)
    code, out, err = run(capsys, "fmt", str(tmp_path / "bad.sde"))
    assert code == 1 and out == ""
    assert f"{tmp_path / 'bad.sde'}:8:5: error: D is not positive semi-definite" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate", "specs/cld.sde"])
    assert info.value.code == 2
    capsys.readouterr()


def test_entry_point_in_a_subprocess():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "sdec", "check", "specs/cld.sde"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("specs/cld.sde: sde cld (recipe form)")
    assert "OK: every proof holds (0 warning(s))" in proc.stdout
