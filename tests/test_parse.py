"""Text → statements → syntax nodes: splitting, comments, numbers, syntax errors and their positions."""
from fractions import Fraction

import pytest
import sympy as sp
from hypothesis import given, settings

import sdec
from sdec.language import syntax as S
from sdec.language.exact import Scope, evaluate, number_value
from sdec.language.parse import MAX_BRACKET_DEPTH, MAX_EXPR_DEPTH, MAX_FILE_BYTES, parse_text, split_statements
from strategies import number_texts

VP = """sde vp
state x
beta(t) = 0.1 + 9.9 * t
T = 1
target normal(0, 1)
Q = [[0]]
D = [[1/2]]
"""


def errors_of(text, filename="f.sde"):
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse(text, filename)
    return info.value


def texts(text):
    statements, diags = split_statements(text, "f.sde")
    assert diags == []
    return [(s.text.rstrip(), s.line, s.column) for s in statements]


# ---- statement splitting ---------------------------------------------------------------

def test_newlines_separate_statements():
    assert texts("sde a\nstate x\n") == [("sde a", 1, 1), ("state x", 2, 1)]


def test_semicolons_separate_statements_and_keep_columns():
    assert texts("sde a; state x;const c = 1") == [("sde a", 1, 1), ("state x", 1, 8), ("const c = 1", 1, 16)]


def test_blank_lines_comments_and_empty_statements_are_dropped():
    text = "# header\n\n   \nsde a ;; ; # trailing; not a separator\n# only a comment\nstate x # c\n"
    assert texts(text) == [("sde a", 4, 1), ("state x # c", 6, 1)]


def test_statement_continues_inside_brackets_across_lines_and_comments():
    text = "Q = [[0, -1],   # first row\n     [1,  0]]\nD = diag(0,\n  1)\n"
    assert texts(text) == [("Q = [[0, -1],   # first row\n     [1,  0]]", 1, 1), ("D = diag(0,\n  1)", 3, 1)]


def test_semicolon_and_brackets_inside_a_comment_do_not_count():
    assert texts("const a = (1 # ) ; [\n)\nconst b = 2") == [("const a = (1 # ) ; [\n)", 1, 1), ("const b = 2", 3, 1)]


def test_leading_indentation_moves_the_statement_column():
    assert texts("  \tconst a = 1") == [("const a = 1", 1, 4)]


def test_multi_line_statement_parses_to_the_same_value():
    one = sdec.parse(VP.replace("D = [[1/2]]", "D = [[1/2]]"))
    two = sdec.parse(VP.replace("D = [[1/2]]", "D = [[\n  1/2   # half\n]]"))
    assert one == two


def test_semicolon_file_equals_newline_file():
    assert sdec.parse(VP.replace("\n", "; ")) == sdec.parse(VP)


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_windows_and_old_mac_line_endings(ending):
    assert sdec.parse(VP.replace("\n", ending)) == sdec.parse(VP)
    assert sdec.parse(VP.replace("\n", ending).encode()) == sdec.parse(VP)


def test_byte_order_mark_is_ignored():
    assert sdec.parse(b"\xef\xbb\xbf" + VP.encode()) == sdec.parse(VP)
    assert sdec.parse("\ufeff" + VP) == sdec.parse(VP)


def test_syntax_nodes_carry_positions():
    nodes, diags = parse_text("sde a\n  const c = 2 * sqrt(3)", "f.sde")
    assert diags == []
    const = nodes[1]
    assert isinstance(const, S.ConstStmt)
    assert (const.span.line, const.span.column) == (2, 3)
    assert (const.name.span.line, const.name.span.column) == (2, 9)
    call = const.value.right
    assert isinstance(call, S.Call) and call.func.name == "sqrt"
    assert (call.span.line, call.span.column, call.span.end_column) == (2, 17, 24)


# ---- numbers ----------------------------------------------------------------------------

NUMBERS = [
    ("1e-3", Fraction(1, 1000)), (".5", Fraction(1, 2)), ("5.", Fraction(5)), ("1_000", Fraction(1000)),
    ("2.5E+2", Fraction(250)), ("1E3", Fraction(1000)), ("0.1", Fraction(1, 10)), ("1_0.2_5", Fraction(41, 4)),
    ("007", Fraction(7)), ("3.14159", Fraction(314159, 100000)), ("1.5e-2", Fraction(3, 200)), ("0e5", Fraction(0)),
    ("123456789012345678901234567890", Fraction(123456789012345678901234567890)),
    ("1e-300", Fraction(1, 10 ** 300)), ("2.5e300", Fraction(25 * 10 ** 299)),
]


def const_value(text, constants=None):
    nodes, diags = parse_text(f"const c = {text}", "f.sde")
    assert diags == []
    return evaluate(nodes[0].value, Scope(constants=constants or {}))


@pytest.mark.parametrize("text,value", NUMBERS)
def test_number_notations_are_exact_rationals(text, value):
    got = const_value(text)
    assert isinstance(got, sp.Rational)
    assert Fraction(int(got.p), int(got.q)) == value


def test_decimal_is_not_rounded_through_float():
    assert const_value("0.1 + 0.2") == sp.Rational(3, 10)  # 0.30000000000000004 in float


def test_operators_and_precedence():
    assert const_value("2 ^ 3 ^ 2") == 512  # right associative
    assert const_value("2 ** 3") == 8
    assert const_value("-2 ^ 2") == -4  # unary minus binds looser than power
    assert const_value("2 ^ -1") == sp.Rational(1, 2)
    assert const_value("1 - 2 - 3") == -4 and const_value("8 / 4 / 2") == 1
    assert const_value("1 + 2 * 3") == 7 and const_value("(1 + 2) * 3") == 9
    assert const_value("sqrt(2) ^ 2") == 2 and const_value("exp(0) + log(1) + sin(0) + cos(0) + tanh(0)") == 2
    assert const_value("pi") == sp.pi


def test_matrix_functions():
    M = const_value("[[1, 2], [3, 4]] @ inv([[1, 2], [3, 4]])")
    assert M == sp.eye(2)
    assert const_value("transpose([[1, 2], [3, 4]])") == sp.Matrix([[1, 3], [2, 4]])
    assert const_value("diag(1, 2) + eye(2) + zeros(2) + 0 * ones(2, 2)") == sp.diag(2, 3)


def test_number_in_a_full_spec_is_exact():
    spec = sdec.parse(VP.replace("T = 1", "T = 2.5E-1"))
    assert spec.T == sp.Rational(1, 4) and spec.t_min == sp.Rational(1, 1000)


# ---- syntax errors: a table of bad inputs ---------------------------------------------------
# (text, message fragment, line, column): the position is where the reader should look.

EXPECT = "expected '(', '+', '-', '[', a name, a number"
SYNTAX_ERRORS = [
    ("sde", "unexpected end of statement; expected a name", 1, 4),
    ("sde 1x", "unexpected '1'; expected a name", 1, 5),
    ("sde s s", "unexpected 's'; expected end of statement", 1, 7),
    ("state", "unexpected end of statement; expected a name", 1, 6),
    ("state x,", "unexpected end of statement; expected a name", 1, 9),
    ("state (x, v)", "unexpected '('; expected a name", 1, 7),
    ("const = 1", "unexpected '='; expected a name", 1, 7),
    ("const a 1", "unexpected '1'; expected '='", 1, 9),
    ("const a = ", f"unexpected end of statement; {EXPECT}", 1, 10),
    ("const a = 1 +", f"unexpected end of statement; {EXPECT}", 1, 14),
    ("const a = 1 + # comment", f"unexpected end of statement; {EXPECT}", 1, 14),
    ("const a = 1 2", "unexpected '2'", 1, 13),
    ("const a = 2(3)", "unexpected '('", 1, 12),
    ("const a = $", "unexpected character '$'", 1, 11),
    ("const a = x!", "unexpected character '!'", 1, 12),
    ("const a = 'x'", "unexpected character \"'\"", 1, 11),
    ("const α = 1", "unexpected character 'α'", 1, 7),
    ("const a = 1 – 2", "unexpected character '–'", 1, 13),
    ("const a = 1e", "unexpected 'e'", 1, 12),
    ("const a = 1__0", "unexpected '__0'", 1, 12),
    ("const a = 0x10", "unexpected 'x10'", 1, 12),
    ("x = 1.2.3", "unexpected '.3'", 1, 8),
    ("@", "unexpected '@'; expected a name", 1, 1),
    ("+ 1", "unexpected '+'; expected a name", 1, 1),
    ("init v normal(0, 1)", "unexpected 'normal'; expected '~'", 1, 8),
    ("init v ~ normal(0)", "unexpected ')'; expected ','", 1, 18),
    ("init v ~ uniform(0, 1)", "unexpected 'uniform'; expected 'normal'", 1, 10),
    ("target normal 0, 1", "unexpected '0'; expected '('", 1, 15),
    ("target normal(0, 1, 2)", "unexpected ','; expected ')'", 1, 19),
    ("learn Q skew init I", "unexpected 'skew'; expected ':'", 1, 9),
    ("learn Q: skew", "unexpected end of statement; expected '(', 'init', 'mask', 'on'", 1, 14),
    ("learn Q: skew init", f"unexpected end of statement; {EXPECT}", 1, 19),
    ("learn D: lowrank(r) init I", "unexpected 'r'; expected a number", 1, 18),
    ("learn Q: skew on x init I", "unexpected 'x'; expected '('", 1, 18),
    ("param a > b = 1", "unexpected 'b'; expected a number", 1, 11),
    ("param a == 1", "unexpected '='", 1, 10),
    ("Q[x] = 1", "unexpected ']'; expected ','", 1, 4),
    ("Q[x, v, w] = 1", "unexpected ','; expected ']'", 1, 7),
    ("dx = v dt +", f"unexpected end of statement; {EXPECT}, dW", 1, 12),
    ("dx = v dt + 1", "unexpected end of statement; expected dW", 1, 14),
    ("dx = v dt dW", "unexpected 'dW'; expected '+' or '-'", 1, 11),
    ("dx = v dt * dW", "unexpected '*'; expected '+' or '-'", 1, 11),
    ("beta t = 1", "unexpected 't'; expected '(', '=', '['", 1, 6),
    ("f(t, s) = 1", "unexpected ','; expected ')'", 1, 4),
    ("x = [1, 2,]", f"unexpected ']'; {EXPECT}", 1, 11),
    ("x = [[1, 2] [3, 4]]", "unexpected '['", 1, 13),
    ("x = ()", f"unexpected ')'; {EXPECT}", 1, 6),
    ("x = 1 ^ ^ 2", f"unexpected '^'; {EXPECT}", 1, 9),
    ("sde s\n\nconst a = 1\n    const b = 2 *\n", f"unexpected end of statement; {EXPECT}", 4, 18),
    ("sde s; const a = ; const b = 2", f"unexpected end of statement; {EXPECT}", 1, 17),
    ("const a = (1 +\n   2 +)\n", f"unexpected ')'; {EXPECT}", 2, 7),
    ("const a = 1 # ok\nconst b = 2 2 # bad", "unexpected '2'", 2, 13),
    # brackets, found before any statement is parsed
    ("x = (1", "'(' is never closed", 1, 5),
    ("x = [[1, 2],\n     [3, 4]\nD = 1", "'[' is never closed", 1, 5),
    ("x = 1)", "unmatched ')'", 1, 6),
    ("x = [1, 2)", "')' does not match '[' opened at line 1 column 5", 1, 10),
    ("x = ([)]", "')' does not match '[' opened at line 1 column 6", 1, 7),
]


@pytest.mark.parametrize("text,fragment,line,column", SYNTAX_ERRORS)
def test_syntax_error_message_and_position(text, fragment, line, column):
    exc = errors_of(text)
    assert fragment in exc.message
    assert (exc.filename, exc.line, exc.column) == ("f.sde", line, column)
    rendered = exc.render()
    assert rendered.startswith(f"f.sde:{line}:{column}: error: ")
    source_line = text.split("\n")[line - 1].replace("\t", " ")
    caret_line = rendered.split("\n")[2]
    assert rendered.split("\n")[1] == "    " + source_line
    assert caret_line.index("^") == 4 + column - 1


def test_hints_for_juxtaposition_and_leading_operator():
    exc = errors_of("const a = 2 x")
    assert "write a * b" in exc.diagnostics[0].hint
    exc = errors_of("const a = 1\n  - 2")
    assert (exc.line, exc.column) == (2, 3)
    assert "wrap it in parentheses" in exc.diagnostics[0].hint


def test_several_syntax_errors_in_one_run():
    text = "sde s\nconst a = $\nconst b = 1 +\nstate x y\nconst c = (1\n"
    exc = errors_of(text)
    where = [(d.span.line, d.span.column) for d in exc.errors]
    assert where == [(5, 11), (2, 11), (3, 14), (4, 9)]  # bracket errors are found first
    assert len(exc.render().split("error:")) == 5


def test_unbalanced_bracket_drops_only_its_statement():
    exc = errors_of("sde s\nx = ]\ny = $\n")
    assert [(d.span.line, d.span.column) for d in exc.errors] == [(2, 5), (3, 5)]


# ---- limits: nesting, size, bytes -------------------------------------------------------------

def test_bracket_nesting_limit():
    depth = MAX_BRACKET_DEPTH + 1
    exc = errors_of("const a = " + "(" * depth + "1" + ")" * depth)
    assert f"brackets nested too deeply (more than {MAX_BRACKET_DEPTH} levels)" in exc.message
    assert (exc.line, exc.column) == (1, 11 + MAX_BRACKET_DEPTH)


def test_bracket_nesting_at_the_limit_is_fine():
    depth = MAX_BRACKET_DEPTH
    nodes, diags = parse_text("const a = " + "(" * depth + "1" + ")" * depth, "f.sde")
    assert diags == [] and evaluate(nodes[0].value, Scope()) == 1


@pytest.mark.parametrize("text", ["-" * 5000 + "1", "2^" * 300 + "1", "+".join(["1"] * 2000),
                                  "sqrt(" * 60 + "2" + ")" * 60 + "+" + "-" * 200 + "1"])
def test_expression_depth_limit_is_an_error_not_a_recursion_error(text):
    exc = errors_of("sde s\nconst a = " + text)
    assert "expression nested too deeply" in exc.message and f"limit is {MAX_EXPR_DEPTH}" in exc.message
    assert (exc.line, exc.column) == (2, 1)


def test_empty_and_blank_files():
    for text in ["", "   \n\t\n", b"", b"\xef\xbb\xbf"]:
        exc = errors_of(text)
        assert "is empty" in exc.message and exc.filename is None
    exc = errors_of("# only a comment\n")
    assert exc.message == "missing the spec name" and (exc.line, exc.column) == (1, 1)


def test_invalid_utf8_points_at_the_byte_and_shows_the_line():
    exc = errors_of(b"sde s\nstate x\xff\n")
    assert exc.message == "file is not valid UTF-8 text (byte 0xff)"
    assert (exc.line, exc.column) == (2, 8)
    assert "    state x\ufffd" in exc.render()


def test_nul_byte():
    exc = errors_of(b"sde s\nst\x00ate x\n")
    assert "NUL byte" in exc.message and (exc.line, exc.column) == (2, 3)
    assert "NUL byte" in errors_of("a\x00").message


def test_binary_garbage():
    exc = errors_of(bytes(range(256)) * 4)
    assert exc.line is not None and exc.message


def test_file_size_limit():
    exc = errors_of(b"#" * (MAX_FILE_BYTES + 1))
    assert f"limited to {MAX_FILE_BYTES}" in exc.message


@pytest.mark.parametrize("text,fragment", [
    ("1e401", "out of range"), ("1e-401", "out of range"), ("9" * 61, "significant digits"),
    ("0." + "0" * 5000 + "1", "out of range"), ("1e" + "9" * 5000, "out of range"),
    ("10^10^10", "exponent is too large"), ("2^2000", "exponent is too large"), ("(2^1000)^4", "too large"),
    ("(2^1000)*(2^1000)*(2^1000)*(2^1000)*(2^1000)", "too large"), ("exp(1000)", "out of range"),
    ("exp(exp(exp(10)))", "out of range"), ("pi^pi^pi^pi", "too large"), ("(exp(700)^1000)^2", "too large"),
    ("1/0", "division by zero"), ("0^-1", "division by zero"), ("log(0)", "not positive"),
    ("sqrt(-1)", "negative"), ("(-1)^(1/2)", "not real"), ("(-2)^sqrt(2)", "not real"),
])
def test_absurd_numbers_are_errors_at_the_number(text, fragment):
    exc = errors_of(VP + f"const a = {text}\n")
    assert fragment in exc.message
    assert exc.line == 8 and exc.column >= 11


def test_huge_but_exact_numbers_are_kept_exactly():
    assert const_value("1e400") == sp.Integer(10) ** 400 and const_value("1e-400") == sp.Rational(1, 10 ** 400)
    assert const_value("1" + "0" * 100) == sp.Integer(10) ** 100  # trailing zeros are not significant digits
    assert const_value("0" * 5000 + "1.5") == sp.Rational(3, 2)
    assert const_value("2^1000") == sp.Integer(2) ** 1000


@settings(max_examples=300, deadline=None)
@given(number_texts())
def test_number_value_agrees_with_python_fractions(text):
    got = number_value(S.Number(text))
    want = Fraction(text)
    assert (int(got.p), int(got.q)) == (want.numerator, want.denominator)


# ---- files --------------------------------------------------------------------------------------

def test_parse_file_takes_str_and_path_and_names_the_file(tmp_path):
    path = tmp_path / "vp.sde"
    path.write_text(VP)
    assert sdec.parse_file(path) == sdec.parse_file(str(path)) == sdec.parse(VP)
    assert sdec.parse_file(path).filename == str(path)
    path.write_text(VP.replace("T = 1", "T = -1"))
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse_file(path)
    assert (info.value.filename, info.value.line, info.value.column) == (str(path), 4, 5)
    assert info.value.render().startswith(f"{path}:4:5: error: T must be a positive number, got -1")


def test_parse_file_of_a_missing_file_or_a_directory(tmp_path):
    for target, fragment in [(tmp_path / "missing.sde", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(sdec.SpecError) as info:
            sdec.parse_file(target)
        assert fragment in info.value.message and info.value.line is None


def test_analyze_never_raises_for_a_bad_spec():
    result = sdec.analyze("sde s\nconst a = $\n", "f.sde")
    assert not result.ok and result.spec is None
    assert [(d.span.line, d.span.column) for d in result.diagnostics] == [(2, 11)]
