"""Hypothesis fuzzing of the front end: random bytes, token soups from the grammar's vocabulary,
and mutations of the shipped specs. sdec.parse either returns a spec or raises SpecError, and
every SpecError says where (or at least what); nothing else escapes.

The default profile keeps the suite fast; the slow-marked tests run the same properties with
many more examples (pytest -m slow)."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdec
from sdec.language.ir import Spec
from strategies import SOURCES, SPECS, TOKENS, mutated

QUICK = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MUTATE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
