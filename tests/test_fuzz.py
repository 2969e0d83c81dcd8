"""Hypothesis fuzzing of the front end: random bytes, token soups from the grammar's vocabulary,
and mutations of the shipped specs. sdec.parse either returns a spec or raises SpecError, and
every SpecError says where (or at least what); nothing else escapes.

The default profile keeps the suite fast; the slow-marked tests run the same properties with
many more examples (pytest -m slow)."""
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdec
from sdec.language.ir import Spec

SPECS = sorted((pathlib.Path(__file__).resolve().parent.parent / "specs").glob("*.sde"))
SOURCES = [p.read_text(encoding="utf-8") for p in SPECS]

QUICK = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MUTATE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYWORDS = ["sde", "state", "const", "param", "init", "target", "normal", "learn", "on", "mask", "dt",
            "beta", "T", "t_min", "Q", "D", "drift", "diffusion", "skew", "psd", "diagonal", "lowrank",
            "random", "t", "pi", "I", "diag", "eye", "zeros", "ones", "inv", "transpose", "sqrt", "exp",
            "log", "sin", "cos", "tanh", "x", "v", "w", "dx", "dv", "dW", "dW_a", "M", "Gamma"]
NUMBERS = ["0", "1", "2", "-1", "0.5", ".5", "5.", "1e-3", "1_000", "2.5E+2", "1e400", "9" * 70, "1e99999", "0.01"]
PUNCT = ["(", ")", "[", "]", ",", "=", "+", "-", "*", "/", "^", "**", "@", "~", ":", ">", ";", "#", "\n", "\n",
         " ", "\t", "[[", "]]", "$", "\x00", "é", "\ufeff", "\r"]
TOKENS = st.sampled_from(KEYWORDS + NUMBERS + PUNCT)


def outcome(data, filename="fuzz.sde"):
    """Parse; return the spec or the SpecError, after checking the error is well formed."""
    try:
        return sdec.parse(data, filename)
    except sdec.SpecError as exc:
        assert isinstance(exc, ValueError)
        assert exc.message and exc.errors
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        lines = max(1, text.count("\n") + text.count("\r") + 1)
        for d in exc.errors:
            assert d.message
            if d.span is not None:
                assert d.span.file == filename
                assert 1 <= d.span.line <= lines + 1 and d.span.column >= 1
        if exc.line is not None:
            assert exc.column is not None and exc.filename == filename
        rendered = exc.render()
        assert rendered and "Traceback" not in rendered
        return exc


def assert_clean(data):
    result = outcome(data)
    assert isinstance(result, (Spec, sdec.SpecError))
    if isinstance(result, Spec):
        assert result.report.ok
    return result


# ---- random bytes and text ----------------------------------------------------------------------

@QUICK
@given(st.binary(max_size=400))
def test_random_bytes(data):
    assert_clean(data)


@QUICK
@given(st.text(max_size=300))
def test_random_text(text):
    assert_clean(text)


@QUICK
@given(st.lists(TOKENS, max_size=60).map(" ".join))
def test_token_soup(text):
    assert_clean(text)


@QUICK
@given(st.lists(TOKENS, max_size=80).map("".join))
def test_token_soup_without_spaces(text):
    assert_clean(text)


@QUICK
@given(st.sampled_from(SOURCES), st.lists(TOKENS, max_size=30).map(" ".join))
def test_shipped_spec_with_a_random_statement_appended(source, tail):
    assert_clean(source + tail)


# ---- mutations of the shipped specs -----------------------------------------------------------------

@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        kind = draw(st.sampled_from(["delete", "insert", "truncate", "replace", "swap_lines", "duplicate_line"]))
        i = draw(st.integers(0, len(text)))
        if kind == "delete":
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(TOKENS) + text[i:]
        elif kind == "truncate":
            text = text[:i]
        elif kind == "replace" and i < len(text):
            text = text[:i] + draw(TOKENS) + text[i + 1:]
        else:
            lines = text.split("\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == "swap_lines":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(b, lines[a])
            text = "\n".join(lines)
    return text


@MUTATE
@given(mutated())
def test_mutated_shipped_specs(text):
    assert_clean(text)


@MUTATE
@given(mutated())
def test_mutated_shipped_specs_as_bytes(text):
    assert_clean(text.encode("utf-8"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_truncation_of_a_shipped_spec(path):
    data = path.read_bytes()
    step = max(1, len(data) // 40)
    for cut in range(0, len(data), step):
        assert_clean(data[:cut])


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_single_line_deleted(path):
    lines = path.read_text().split("\n")
    for i in range(len(lines)):
        result = assert_clean("\n".join(lines[:i] + lines[i + 1:]))
        if lines[i].strip() and not lines[i].lstrip().startswith("#") and isinstance(result, sdec.SpecError):
            assert result.line is None or result.line >= 1


# ---- the heavy profile ------------------------------------------------------------------------------

@pytest.mark.slow
@HEAVY
@given(st.binary(max_size=2000))
def test_random_bytes_heavy(data):
    assert_clean(data)


@pytest.mark.slow
@HEAVY
@given(st.lists(TOKENS, max_size=200).map(" ".join))
def test_token_soup_heavy(text):
    assert_clean(text)


@pytest.mark.slow
@HEAVY
@given(mutated())
def test_mutated_shipped_specs_heavy(text):
    assert_clean(text)
