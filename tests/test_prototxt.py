"""The hand-written protobuf text reader: every syntax form, positions, templates, errors."""

import glob
import math
import os
import re

import pytest

from pacnet.errors import LoadError
from pacnet.prototxt import Ident, Message, parse, parse_file, parse_scalar

GRAPHS = "/work/shared/graphs"
if not os.path.isdir(GRAPHS):
    GRAPHS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "graphs")


def one(text, **kw):
    return parse(text, **kw).fields


# ----------------------------------------------------------------------------- syntax

def test_scalars_messages_and_positions():
    m = parse('name: "net"\nlayer {\n  name: "c1"  type: "Convolution"\n'
              '  convolution_param { num_output: 64 kernel_size: 3 }\n}\n')
    assert [f.name for f in m] == ["name", "layer"]
    assert m.get("name") == "net"
    layer = m.get("layer")
    assert isinstance(layer, Message)
    assert (layer.line, layer.col) == (2, 7)           # the brace
    f = m.field("layer")
    assert (f.line, f.col) == (2, 1)
    t = layer.field("type")
    assert (t.line, t.col, t.vline, t.vcol) == (3, 15, 3, 21)
    conv = layer.get("convolution_param")
    assert conv.get("num_output") == 64 and conv.field("num_output").kind == "int"
    assert conv.field("kernel_size").col == 38


def test_repeated_fields_keep_order():
    m = parse("top: 'a' bottom: 'x' top: 'b'\nparam { lr_mult: 1 } param { lr_mult: 2 }")
    assert m.values("top") == ["a", "b"]
    assert [p.get("lr_mult") for p in m.values("param")] == [1, 2]
    assert [f.name for f in m] == ["top", "bottom", "top", "param", "param"]
    assert m.to_dict() == {"top": ["a", "b"], "bottom": "x",
                           "param": [{"lr_mult": 1}, {"lr_mult": 2}]}


def test_colon_before_brace_angle_brackets_and_separators():
    m = parse("include: { phase: TRAIN }; shape < dim: 1, dim: 2 >, a: 1;")
    assert m.get("include").get("phase") == "TRAIN"
    assert isinstance(m.get("include").get("phase"), Ident)
    assert m.get("shape").values("dim") == [1, 2]
    assert m.get("a") == 1


def test_list_syntax_for_scalars_and_messages():
    m = parse("dim: [1, 3, 500, 500]\nmean_value: []\nrule [{phase: TRAIN}, {phase: TEST}]\n"
              "rule2: [ { stage: 'x' } ]")
    assert m.values("dim") == [1, 3, 500, 500]
    assert m.all("mean_value") == []
    assert [r.get("phase") for r in m.values("rule")] == ["TRAIN", "TEST"]
    assert m.get("rule2").get("stage") == "x"
    # each element is a separate entry, positioned at the field name
    assert {f.line for f in m.all("dim")} == {1}


@pytest.mark.parametrize("text,value,kind", [
    ("1", 1, "int"), ("-3", -3, "int"), ("+7", 7, "int"), ("0x1F", 31, "int"), ("0", 0, "int"),
    ("010", 8, "int"), ("-017", -15, "int"), ("0.5", 0.5, "float"), ("010.5", 10.5, "float"),
    ("1.5", 1.5, "float"), ("-0.25", -0.25, "float"), ("1e-5", 1e-5, "float"),
    ("2.5E+3", 2500.0, "float"), (".5", 0.5, "float"), ("1.", 1.0, "float"),
    ("3.0f", 3.0, "float"), ("-1e3", -1000.0, "float"), ("inf", math.inf, "float"),
    ("-inf", -math.inf, "float"), ("Infinity", math.inf, "float"),
    ("MAX", "MAX", "ident"), ("true", "true", "ident"), ("FAN_IN", "FAN_IN", "ident"),
])
def test_number_and_identifier_values(text, value, kind):
    f = parse(f"v: {text}").field("v")
    assert f.kind == kind
    assert f.value == value
    assert type(f.value) is {"int": int, "float": float, "ident": Ident}[kind]


def test_nan():
    f = parse("v: nan").field("v")
    assert f.kind == "float" and math.isnan(f.value)
    assert parse_scalar("-nan")[1] == "float"


def test_strings_escapes_quotes_and_concatenation():
    m = parse(r'''a: "tab\tnl\nq\"bs\\"  b: 'single "x"'  c: "\x41\101\u00e9"  d: "ab" 'cd' "" ''')
    assert m.get("a") == 'tab\tnl\nq"bs\\'
    assert m.get("b") == 'single "x"'
    assert m.get("c") == "AAé"
    assert m.get("d") == "abcd"
    assert m.field("d").kind == "string"


def test_comments_crlf_tabs_and_bom():
    text = "\ufeff# header\r\nlayer {\t# trailing\r\n\tname: \"x#y\" # not in string\r\n}\r\n#end"
    m = parse(text)
    layer = m.get("layer")
    assert layer.get("name") == "x#y"
    assert (layer.field("name").line, layer.field("name").col) == (3, 2)


def test_empty_and_comment_only():
    assert len(parse("")) == 0
    assert len(parse("# nothing\n   \n")) == 0


# ----------------------------------------------------------------------------- templates

def test_vars_substitute_in_bare_values_and_strings_not_comments():
    text = 'name: "fc1_${EXP}"\nnum_output: ${N}\n# ${UNSET_IN_COMMENT}\nlr: ${LR}\nmode: ${M}'
    m = parse(text, {"EXP": "voc12", "N": 21, "LR": 0.5, "M": "MAX"})
    assert m.get("name") == "fc1_voc12"
    assert m.get("num_output") == 21 and m.field("num_output").kind == "int"
    assert m.get("lr") == 0.5
    assert m.get("mode") == "MAX"
    # the value keeps its place in the original text
    assert (m.field("num_output").vline, m.field("num_output").vcol) == (2, 13)


def test_var_that_is_not_a_token_becomes_a_string():
    m = parse("source: ${LIST}", {"LIST": "a/b c.txt"})
    assert m.get("source") == "a/b c.txt" and m.field("source").kind == "string"
    assert parse("flag: ${B}", {"B": True}).get("flag") == "true"


def test_all_unset_vars_in_one_error():
    text = 'name: "${NET_ID}"\n\nlayer {\n  num_output: ${NUM_LABELS}\n  name: "${EXP}_${NUM_LABELS}"\n}\n'
    with pytest.raises(LoadError) as e:
        parse(text, {"NET_ID": "x"}, file="net.prototxt")
    msg = str(e.value)
    assert "unset template variables: NUM_LABELS (line 4), EXP (line 5)" in msg
    assert "--var NAME=VALUE" in msg
    assert e.value.location.file == "net.prototxt" and e.value.location.line == 4
    assert "NET_ID" not in msg.split("\n")[0]


def test_bad_variable_name():
    with pytest.raises(LoadError, match="bad template variable"):
        parse("a: ${1-x}")


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("text,line,col,fragment", [
    ("layer {\n  name: \"x\"\n", 3, 1, "expected '}' to close 'layer' opened at line 1"),
    ("a: \"unterminated\nb: 1", 1, 4, "unterminated string"),
    ("a 1", 1, 3, "expected ':' or '{' after field name 'a'"),
    ("a: }", 1, 4, "expected a value for field 'a'"),
    ("}", 1, 1, "expected a field name"),
    ("a: 1.2.3", 1, 4, "bad value '1.2.3'"),
    ("a: 09", 1, 4, "bad value '09'"),
    ("layer {\n  a: 1\n  }\n}", 4, 1, "extra '}'"),
    ("a: [1, 2", 1, 9, "expected ']' to close the list of 'a'"),
    ("a: [1 2]", 1, 7, "expected ',' or ']'"),
    ("a: 1 @", 1, 6, "unexpected character '@'"),
    ("a: \"bad \\q escape\"", 1, 9, "unknown escape"),
    ("3: 4", 1, 1, "expected a field name, got '3'"),
    ("a:", 1, 3, "expected a value for field 'a', got end of file"),
    ("a {\r\n\tb: 1\r\n\tc {\r\n", 4, 1, "'c' opened at line 3, column 2"),
])
def test_errors_have_line_col_and_expectation(text, line, col, fragment):
    with pytest.raises(LoadError) as e:
        parse(text, file="f.prototxt")
    loc = e.value.location
    assert (loc.file, loc.line, loc.col) == ("f.prototxt", line, col), str(e.value)
    assert fragment in str(e.value)
    assert str(e.value).startswith(f"f.prototxt:{line}:{col}:")


def test_parse_file_errors(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        parse_file(tmp_path / "missing.prototxt")
    with pytest.raises(LoadError, match="is a directory"):
        parse_file(tmp_path)
    binary = tmp_path / "w.prototxt"
    binary.write_bytes(b"\n\x04conv\x00\x01\xff\xfe")
    with pytest.raises(LoadError, match="binary file"):
        parse_file(binary)
    latin = tmp_path / "l.prototxt"
    latin.write_bytes(b'name: "caf\xe9"\n')
    with pytest.raises(LoadError) as e:
        parse_file(latin)
    assert "not valid UTF-8" in str(e.value) and e.value.location.line == 1


def test_truncated_real_file_reports_its_end():
    path = os.path.join(GRAPHS, "fcn", "voc-fcn8s", "deploy.prototxt")
    if not os.path.exists(path):
        pytest.skip("shared graphs not available")
    text = open(path, encoding="utf-8").read()
    cut = text[: len(text) // 2]
    with pytest.raises(LoadError) as e:
        parse(cut, file="half.prototxt")
    assert "unexpected end of file" in str(e.value)
    assert e.value.location.line == cut.count("\n") + 1


# ----------------------------------------------------------------------------- real files

def _all_prototxts():
    return sorted(glob.glob(os.path.join(GRAPHS, "**", "*.prototxt"), recursive=True))


@pytest.mark.skipif(not _all_prototxts(), reason="shared graphs not available")
def test_every_shared_prototxt_parses_with_its_variables():
    files = _all_prototxts()
    assert len(files) >= 49
    for path in files:
        text = open(path, encoding="utf-8").read()
        names = set(re.findall(r"\$\{(\w+)\}", text))
        m = parse_file(path, {n: 1 for n in names})
        n_layers = len(m.all("layer")) + len(m.all("layers"))
        if "solver" in os.path.basename(path):
            assert n_layers == 0 and m.has("base_lr"), path
        else:
            assert n_layers > 0, path
        if names:
            with pytest.raises(LoadError, match="unset template variables"):
                parse_file(path)
