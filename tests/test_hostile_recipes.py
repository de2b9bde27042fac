"""Recipes as hostile input: every malformed recipe or plan is a located, one-line RecipeError (or a valid recipe),
never another exception; recipes cannot make fxquant open files outside their folder.

A fixed corpus (one case per finding) and a hypothesis fuzzer that mutates the built-in recipes.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxquant
import fxquant.cli
from fxquant.config import builtin_names, dumps_toml
from fxquant.config.files import MAX_DEPTH
from fxquant.errors import RecipeError


def located(err: RecipeError, file: Path | str, key: str | None = None) -> None:
    """The error is one printable line that starts with the file holding the problem (and names the key)."""
    text = str(err)
    assert "\n" not in text and text.isprintable(), text
    assert text.startswith(f"{file}: "), text
    if key is not None:
        assert text.startswith(f"{file}: {key}: "), text


def write(folder: Path, name: str, content: bytes | str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# -- bytes a recipe file may hold ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [
        "name = 'café'\n".encode("latin-1"),
        "name = 'x'\n".encode("utf-16"),
        bytes(range(256)),
        b"a = " + b"[" * 2000 + b"]" * 2000,
        b"[train]\nx = " + b"[" * 600 + b"]" * 600,
        b"quant = " + b"{a = " * 500 + b"1" + b"}" * 500,
        b"[quant]\nrule = " + b"[" * (MAX_DEPTH + 2) + b"]" * (MAX_DEPTH + 2),
        b"name = 'x' = 'y'",
    ],
    ids=["latin1", "utf16", "binary", "deep-array", "deep-array-600", "deep-inline-table", "just-too-deep", "toml"],
)
def test_unreadable_bytes_are_located_errors(tmp_path, content):
    path = write(tmp_path, "bad.toml", content)
    with pytest.raises(RecipeError) as err:
        fxquant.load_recipe(path)
    located(err.value, path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path, "bom.toml", b"\xef\xbb\xbfextends = 'lsq_w4a4'\n")
    assert fxquant.load_recipe(path).quant.weight.bits == 4


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = write(tmp_path, "big.toml", b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(RecipeError, match="limited to") as err:
        fxquant.load_recipe(path)
    located(err.value, path)


# -- extends and plan stay inside the declaring file's folder ----------------------------------------------------
@pytest.mark.parametrize(
    "reference",
    ["/etc/passwd", "/etc/hostname.toml", "../outside.toml", "sub/../../outside.toml", "plain.txt", "", "sub"],
)
@pytest.mark.parametrize("key", ["extends", "bits.plan"])
def test_references_outside_the_folder_are_refused_at_the_declaring_key(tmp_path, reference, key):
    write(tmp_path, "outside.toml", "[plan]\nconv1 = { weight = 3 }\n")
    folder = tmp_path / "recipes"
    (folder / "sub").mkdir(parents=True)
    text = f"extends = {reference!r}\n" if key == "extends" else f"extends = 'lsq_w4a4'\n[bits]\nplan = {reference!r}\n"
    path = write(folder, "r.toml", text)
    with pytest.raises(RecipeError) as err:
        fxquant.load_recipe(path)
    located(err.value, path, key)


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path):
    write(tmp_path, "secret.toml", "extends = 'lsq_w4a4'\n")
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "link.toml").symlink_to(tmp_path / "secret.toml")
    path = write(folder, "r.toml", "extends = 'link.toml'\n")
    with pytest.raises(RecipeError, match="leads outside") as err:
        fxquant.load_recipe(path)
    located(err.value, path, "extends")


def test_references_inside_the_folder_work_and_a_parents_plan_is_next_to_the_parent(tmp_path):
    write(tmp_path, "sub/plan.toml", "[plan]\nconv1 = { weight = 3 }\n")
    write(tmp_path, "sub/parent.toml", "extends = 'lsq_w4a4'\n[bits]\nplan = 'plan.toml'\n")
    child = write(tmp_path, "child.toml", "extends = 'sub/parent.toml'\n")
    assert fxquant.load_recipe(child).bit_plan == {"conv1": (3, None)}


def test_a_cycle_through_an_unnormalised_path_is_found(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(tmp_path, "x.toml", "extends = 'sub/../x.toml'\n")
    with pytest.raises(RecipeError, match="cycle") as err:
        fxquant.load_recipe(path)
    located(err.value, path, "extends")


def test_a_long_extends_chain_is_a_located_error(tmp_path):
    for i in range(40):
        write(tmp_path, f"c{i}.toml", f"extends = 'c{i + 1}.toml'\n")
    write(tmp_path, "c40.toml", "extends = 'lsq_w4a4'\n")
    with pytest.raises(RecipeError, match="longer than") as err:
        fxquant.load_recipe(tmp_path / "c0.toml")
    assert str(err.value).startswith(str(tmp_path))


def test_a_stored_recipe_may_not_name_files():
    from fxquant.config.recipe import recipe_from_text

    with pytest.raises(RecipeError, match="self-contained"):
        recipe_from_text(b"extends = 'lsq_w4a4'\n", "ckpt: recipe")
    with pytest.raises(RecipeError, match="self-contained"):
        recipe_from_text(b"[bits]\nplan = 'p.toml'\n", "ckpt: recipe")


# -- blame the file that holds the problem ----------------------------------------------------------------------
def test_a_parents_unknown_key_names_the_parent(tmp_path):
    parent = write(tmp_path, "parent.toml", "extends = 'lsq_w4a4'\n[quant]\nwieght = { bits = 3 }\n")
    child = write(tmp_path, "child.toml", "extends = 'parent.toml'\n[train]\nepochs = 2\n")
    with pytest.raises(RecipeError, match="did you mean 'weight'") as err:
        fxquant.load_recipe(child)
    located(err.value, parent, "quant.wieght")


def test_a_parents_bad_value_names_the_parent_and_a_childs_names_the_child(tmp_path):
    parent = write(tmp_path, "parent.toml", "extends = 'lsq_w4a4'\n[train]\nlr = -1.0\n")
    child = write(tmp_path, "child.toml", "extends = 'parent.toml'\n[train]\nepochs = 2\n")
    with pytest.raises(RecipeError) as err:
        fxquant.load_recipe(child)
    located(err.value, parent, "train.lr")
    fixed = write(tmp_path, "fixed.toml", "extends = 'parent.toml'\n[train]\nlr = 0.1\nepochs = 0\n")
    with pytest.raises(RecipeError) as err:
        fxquant.load_recipe(fixed)
    located(err.value, fixed, "train.epochs")


def test_an_unknown_builtin_in_extends_names_the_declaring_file(tmp_path):
    path = write(tmp_path, "r.toml", "extends = 'lsq_w4a5'\n")
    with pytest.raises(RecipeError, match="did you mean 'lsq_w4a4'") as err:
        fxquant.load_recipe(path)
    located(err.value, path, "extends")


def test_a_missing_plan_names_the_declaring_file(tmp_path):
    path = write(tmp_path, "r.toml", "extends = 'lsq_w4a4'\n[bits]\nplan = 'none.toml'\n")
    with pytest.raises(RecipeError, match="not found") as err:
        fxquant.load_recipe(path)
    located(err.value, path, "bits.plan")


@pytest.mark.parametrize(
    ("plan", "key"),
    [
        ("[plan]\nconv1 = { weight = 99 }\n", "plan.conv1.weight"),
        ("[plan]\nconv1 = { activation = 3 }\nconv2 = 3\n", "plan.conv2"),
        ("[plan]\nconv1 = { wieght = 3 }\n", "plan.conv1.wieght"),
        ("[plans]\nconv1 = { weight = 3 }\n", "plan"),
        ("plan = 3\n", "plan"),
    ],
)
def test_bad_plan_content_names_the_plan_file_and_key(tmp_path, plan, key):
    plan_path = write(tmp_path, "p.toml", plan)
    path = write(tmp_path, "r.toml", "extends = 'lsq_w4a4'\n[bits]\nplan = 'p.toml'\n")
    with pytest.raises(RecipeError) as err:
        fxquant.load_recipe(path)
    located(err.value, plan_path, key)


# -- values -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("[train]\nlr = inf", "train.lr"),
        ("[train]\nweight_decay = nan", "train.weight_decay"),
        ("[train]\nepochs = 99999999999999999999", "train.epochs"),
        ("[[loss]]\nkind = 'kd'\nweight = inf", "loss[0].weight"),
        ("[optim.sam]\nrho = inf", "optim.sam.rho"),
        ("[search]\nbudget = 'avg3'\ncandidates = [2, 11, 16]", "search.candidates[1]"),
        ("[search]\nbudget = 'lots'", "search.budget"),
        ("[search]\nbudget = '1e999'", "search.budget"),
        ('"" = 1', '""'),
        ('"\\u001b[2J" = 1', '"\\u001b[2J"'),
        ('name = "\\u001b]0;title\\u0007"', "name"),
        ('[taps]\n"\\u202e" = "Conv2d"', 'taps."\\u202e"'),
        ("[[loss]]\nkind = 'consistency'\ntap = 'nosuch'", "loss[0].tap"),
    ],
)
def test_bad_values_are_located(tmp_path, table, key):
    path = write(tmp_path, "r.toml", f"extends = 'lsq_w4a4'\n{table}\n")
    with pytest.raises(RecipeError) as err:
        fxquant.load_recipe(path)
    located(err.value, path, key)


# -- the fuzzer -------------------------------------------------------------------------------------------------
HOSTILE_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["/etc/passwd", "../x.toml", "\x1b[2J", "", "lsq_w4a4", "Conv2d", "avg3", "per_channel"]),
    st.lists(st.integers(min_value=-3, max_value=40), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)


def _paths(table, prefix=()):
    """Every key path of a nested table, and of tables inside lists."""
    for key, value in table.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _paths(item, (*prefix, key, i))


def _container(table, path):
    for part in path[:-1]:
        table = table[part]
    return table


@st.composite
def mutated_recipes(draw) -> dict:
    """A built-in recipe (fully merged) with a few mutations at any depth."""
    data = copy.deepcopy(dict(fxquant.load_recipe(draw(st.sampled_from(builtin_names()))).toml))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _container(data, path)
        action = draw(st.sampled_from(["set", "rename", "insert", "delete", "nest"]))
        if action == "set":
            parent[path[-1]] = draw(HOSTILE_VALUES)
        elif action == "rename" and isinstance(path[-1], str):
            value = parent.pop(path[-1])
            parent[draw(st.text(min_size=0, max_size=10))] = value
        elif action == "insert" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(HOSTILE_VALUES)
        elif action == "delete" and isinstance(path[-1], str):
            del parent[path[-1]]
        elif action == "nest":
            parent[path[-1]] = {"x": parent[path[-1]]}
    return data


def _load_or_located(path: Path) -> None:
    try:
        recipe = fxquant.load_recipe(path)
    except RecipeError as err:
        for problem in str(err).splitlines():  # one line per problem, each located
            assert problem.isprintable(), problem
            assert problem.startswith(str(path.parent)) or problem.startswith("<builtin"), problem
        return
    # accepted: then it is a complete, finite recipe that round-trips through its own TOML
    assert all(math.isfinite(v) for v in _floats(recipe.toml))
    fxquant.load_recipe(write(path.parent, "again.toml", recipe.to_toml()))


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, list):
        for v in value:
            yield from _floats(v)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_recipes())
def test_fuzzed_recipes_load_or_fail_located(tmp_path, data):
    try:
        text = dumps_toml(data)
    except (TypeError, ValueError):
        return  # not representable as TOML (the writer refuses it): nothing a file could hold
    _load_or_located(write(tmp_path, "fuzzed.toml", text))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.lists(st.sampled_from(["[", "]", "{", "}", "a = ", "1", ",", "\n", '"', "[[loss]]", "="]), max_size=80).map(
            lambda parts: "".join(parts).encode()
        ),
    )
)
def test_fuzzed_bytes_load_or_fail_located(tmp_path, content):
    _load_or_located(write(tmp_path, "bytes.toml", content))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    links=st.lists(
        st.sampled_from(["a.toml", "b.toml", "sub/../a.toml", "../a.toml", "/etc/passwd", "lsq_w4a4", "nope", "b"]),
        min_size=3,
        max_size=3,
    )
)
def test_fuzzed_extends_graphs_load_or_fail_located(tmp_path, links):
    folder = tmp_path / "graph"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for name, target in zip(["a.toml", "b.toml", "c.toml"], links, strict=True):
        write(folder, name, f"extends = {target!r}\n")
    _load_or_located(folder / "c.toml")


def test_a_name_too_long_for_the_file_system_is_a_recipe_error(tmp_path):
    """``extends`` (and a path given directly) longer than the file system allows: a located RecipeError, not the
    OSError ("File name too long") that looking the file up raises, and the echoed name is shortened."""
    long_name = "a" * 5000 + ".toml"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{long_name}"\n')
    with pytest.raises(RecipeError, match=r"r\.toml: extends: .*cannot be looked up: File name too long") as caught:
        fxquant.load_recipe(str(recipe))
    assert len(str(caught.value)) < 1000
    with pytest.raises(RecipeError, match=r"cannot read .*File name too long") as caught:
        fxquant.load_recipe(str(tmp_path / long_name))
    assert len(str(caught.value)) < 1000


def test_every_problem_of_a_recipe_is_reported_at_once_one_line_each(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(
        'extends = "lsq_w4a4"\n[quant]\nweight = { bitz = 3, bits = 12 }\nactivation = { granularity = "per_chanel" }\n'
        "[train]\nlr = -1\n[[loss]]\nkind = \"fpq\"\np = 2\n"
    )
    with pytest.raises(RecipeError) as caught:
        fxquant.load_recipe(str(recipe))
    lines = str(caught.value).splitlines()
    expected = [
        r"quant\.weight\.bitz: unknown key.*did you mean 'bits'",
        r"quant\.weight\.bits: bits must be 2\.\.8",
        r"quant\.activation\.granularity: must be one of.*did you mean 'per_channel'",
        r"train\.lr: must be > 0",
        r"loss\[0\]\.p: must be in \[0, 1\]",
    ]
    assert len(lines) == len(expected)
    for line, pattern in zip(lines, expected, strict=True):
        assert line.startswith(f"{recipe}: ") and re.search(pattern, line), line
    assert caught.value.key_path == "quant.weight.bitz"  # the first problem's, for code that reads one
    assert fxquant.cli.main(["validate", str(recipe)]) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == len(expected) and all(line.startswith("fxquant validate: error: ") for line in printed)


def test_the_problems_of_an_extends_chain_are_each_blamed_on_their_own_file(tmp_path):
    (tmp_path / "parent.toml").write_text('extends = "lsq_w4a4"\n[train]\nlr = -1\n')
    (tmp_path / "child.toml").write_text('extends = "parent.toml"\n[quant]\nbn = "fuse"\n')
    with pytest.raises(RecipeError) as caught:
        fxquant.load_recipe(str(tmp_path / "child.toml"))
    lines = sorted(str(caught.value).splitlines())
    assert len(lines) == 2
    assert lines[0].startswith(f"{tmp_path / 'child.toml'}: quant.bn")
    assert lines[1].startswith(f"{tmp_path / 'parent.toml'}: train.lr")
