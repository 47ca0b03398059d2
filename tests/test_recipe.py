"""Recipes and probe files: builtins, validation, task prompts."""

from __future__ import annotations

import json

import pytest

from kvcompile.errors import RecipeError
from kvcompile.recipe import DEFAULT_RECIPE, Recipe, builtin_recipes, load_recipe, read_probes

MINIMAL = 'name = "mine"\ndescription = "Answer questions about prices."\n'


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_builtins_are_listed_sorted_and_include_the_required_ones():
    names = builtin_recipes()
    assert names == sorted(names)
    assert {"faq", "summarize", "multihop", "qa"} <= set(names)
    assert DEFAULT_RECIPE in names


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_loads_with_description_and_probes(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert len(recipe.description.split()) >= 30
    assert 5 <= len(recipe.probes) <= 10
    assert recipe.options == {"ratio": 0.25, "chunk_size": 2048, "sinks": 4}
    assert recipe.source.startswith("#") or recipe.source.startswith("name")
    assert f'name = "{name}"' in recipe.source


def test_task_prompt_is_deterministic_and_lists_probes():
    a, b = load_recipe("faq"), load_recipe("faq")
    assert a.task_prompt() == b.task_prompt()
    prompt = a.task_prompt()
    assert prompt.startswith(a.description)
    assert "Example questions:" in prompt
    for probe in a.probes:
        assert f"\n- {probe}" in prompt


def test_task_prompt_without_probes_is_the_description():
    recipe = Recipe(name="x", description="Just the task.", probes=())
    assert recipe.task_prompt() == "Just the task."


def test_with_probes_appends_dedups_and_keeps_order():
    recipe = Recipe(name="x", description="d", probes=("A?", "B?"))
    more = recipe.with_probes(["C?", "A?", "  ", " D? ", "C?"])
    assert more.probes == ("A?", "B?", "C?", "D?")
    assert recipe.probes == ("A?", "B?")  # the original is untouched
    assert more.task_prompt().endswith("- A?\n- B?\n- C?\n- D?")


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(RecipeError) as err:
        load_recipe("nonsense")
    for name in builtin_recipes():
        assert name in str(err.value)


def test_name_and_file_are_exclusive(tmp_path):
    f = write(tmp_path / "r.toml", MINIMAL)
    with pytest.raises(RecipeError):
        load_recipe("faq", file=f)
    with pytest.raises(RecipeError):
        load_recipe()


def test_load_from_file_keeps_source_exactly(tmp_path):
    text = MINIMAL + 'probes = ["What does X cost?"]\n[options]\nbudget = 512\nratio = 1\n'
    recipe = load_recipe(file=write(tmp_path / "r.toml", text))
    assert recipe.name == "mine"
    assert recipe.probes == ("What does X cost?",)
    assert recipe.options == {"budget": 512, "ratio": 1.0}
    assert recipe.source == text


def test_a_toml_name_is_read_as_a_file(tmp_path):
    f = write(tmp_path / "r.toml", MINIMAL)
    assert load_recipe(str(f)).name == "mine"


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(file=tmp_path / "nope.toml")


def test_bad_toml_error_says_the_line(tmp_path):
    f = write(tmp_path / "bad.toml", 'name = "x"\ndescription = "y"\nprobes = [\n"a", oops\n')
    with pytest.raises(RecipeError, match="not valid TOML.*line 4"):
        load_recipe(file=f)


def test_missing_description_is_an_error(tmp_path):
    f = write(tmp_path / "r.toml", 'name = "x"\n')
    with pytest.raises(RecipeError, match="'description' is missing"):
        load_recipe(file=f)


def test_unknown_option_key_names_it_and_the_allowed_ones(tmp_path):
    f = write(tmp_path / "r.toml", MINIMAL + "[options]\nratoi = 0.5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(file=f)
    message = str(err.value)
    assert "'ratoi'" in message
    for key in ("ratio", "budget", "chunk_size", "sinks"):
        assert key in message


def test_unknown_top_level_key_is_an_error(tmp_path):
    f = write(tmp_path / "r.toml", MINIMAL + 'probe = ["typo?"]\n')
    with pytest.raises(RecipeError, match="unknown key 'probe'"):
        load_recipe(file=f)


@pytest.mark.parametrize(
    "option",
    ["ratio = 0", "ratio = 1.5", "ratio = true", "budget = 0", "budget = 1.5", "chunk_size = 8", "sinks = -1"],
)
def test_out_of_range_options_are_errors(tmp_path, option):
    f = write(tmp_path / "r.toml", MINIMAL + f"[options]\n{option}\n")
    with pytest.raises(RecipeError, match=option.split(" ")[0]):
        load_recipe(file=f)


def test_read_probes_from_text(tmp_path):
    f = write(tmp_path / "probes.txt", "# my questions\n\nWhat is X?\n  How do I Y?  \n\n# done\n")
    assert read_probes(f) == ["What is X?", "How do I Y?"]


def test_read_probes_from_jsonl(tmp_path):
    rows = [{"id": "a", "question": "What is X?", "answers": ["x"]}, {"question": "Who is Y?"}]
    f = write(tmp_path / "q.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_probes(f) == ["What is X?", "Who is Y?"]


def test_read_probes_jsonl_without_question_is_an_error(tmp_path):
    f = write(tmp_path / "q.jsonl", '{"text": "x"}\n')
    with pytest.raises(RecipeError, match="line 1"):
        read_probes(f)


def test_read_probes_empty_is_an_error(tmp_path):
    f = write(tmp_path / "probes.txt", "# only a comment\n\n")
    with pytest.raises(RecipeError, match="no questions"):
        read_probes(f)


def test_read_probes_missing_file_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        read_probes(tmp_path / "nope.txt")


def test_example_questions_work_as_probes():
    from pathlib import Path

    f = Path(__file__).resolve().parent.parent / "docs" / "example-corpus" / "questions.jsonl"
    probes = read_probes(f)
    assert "How do I reset my password?" in probes
