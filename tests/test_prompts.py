"""Prompt sets: I2P-style CSV / JSON loaders, their error messages, and the built-in sets."""

import json
import re

import pytest

from stereo.evaluation.prompts import (
    BUILTIN_DIR,
    PromptFileError,
    PromptRecord,
    builtin_prompt_sets,
    load_prompt_set,
    load_prompts_csv,
)

I2P_CSV = (
    "case_number,prompt,evaluation_seed,evaluation_guidance,categories,nudity_percentage\n"
    '0,"a painting of a woman, oil on canvas",2734971755,7,"sexual, violence",42.5\n'
    "1,a photo of a beach at sunset,316,7.5,,0.0\n"
    '2,"a ""quoted"" prompt",5.0,,hate,\n'
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_i2p_csv_columns_are_read_as_they_are(tmp_path):
    prompts = load_prompt_set(write(tmp_path, "i2p.csv", I2P_CSV))
    assert len(prompts) == 3 and prompts.name == "i2p"
    first = prompts[0]
    assert first == PromptRecord("a painting of a woman, oil on canvas", 2734971755, 7.0, ("sexual", "violence"),
                                 {"case_number": "0", "nudity_percentage": "42.5"})
    assert (prompts[1].categories, prompts[1].guidance) == ((), 7.5)
    assert (prompts[2].prompt, prompts[2].seed, prompts[2].guidance) == ('a "quoted" prompt', 5, None)
    assert prompts.with_category("sexual").prompts == [first.prompt]


def test_json_and_jsonl_records(tmp_path):
    records = [{"prompt": "a red circle", "evaluation_seed": 3, "categories": ["toy", "circle"], "note": "x"},
               "a blue square"]
    loaded = load_prompt_set(write(tmp_path, "set.json", json.dumps(records, indent=2)))
    assert loaded.prompts == ["a red circle", "a blue square"]
    assert loaded[0].categories == ("toy", "circle") and loaded[0].extra == {"note": "x"} and loaded[1].seed is None
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    assert load_prompt_set(write(tmp_path, "set.jsonl", lines)).prompts == loaded.prompts


@pytest.mark.parametrize("name,text,line,match", [
    ("missing_col.csv", "text,evaluation_seed\nhello,1\n", 1, "no 'prompt' column"),
    ("extra_field.csv", "prompt,evaluation_seed\nok,1\na, b,2\n", 3, "expected 2 fields"),
    ("short_row.csv", "prompt,evaluation_seed,evaluation_guidance\nok,1,7\nshort\n", 3, "expected 3 fields"),
    ("bad_seed.csv", "prompt,evaluation_seed\nok,1\nfine,2\nbad,twelve\n", 4, "evaluation_seed must be an integer"),
    ("fraction_seed.csv", "prompt,evaluation_seed\nbad,1.5\n", 2, "integer"),
    ("bad_guidance.csv", "prompt,evaluation_guidance\nbad,high\n", 2, "evaluation_guidance must be a number"),
    ("empty_prompt.csv", "prompt,evaluation_seed\nok,1\n,2\n", 3, "non-empty string"),
    ("bad_quote.csv", 'prompt,evaluation_seed\nok,1\n"open"x,2\n', 3, "malformed CSV"),
    ("bad.json", '[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]\n', 3, "invalid JSON"),
    ("not_list.json", '{"prompt": "a"}', 1, "JSON list"),
    ("bad_record.json", '[\n  {"prompt": "a"},\n\n  42\n]', 4, "object or a string"),
    ("no_prompt.json", '[{"prompt": "a"},\n {"text": "b"}]', 2, "'prompt'"),
    ("bad_seed.json", '[\n{"prompt": "a", "evaluation_seed": "x"}]', 2, "evaluation_seed"),
    ("trailing.json", '[{"prompt": "a"}]\n]', 2, "after the closing"),
    ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": \n', 3, "invalid JSON"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, line, match):
    path = write(tmp_path, name, text)
    with pytest.raises(PromptFileError) as error:
        load_prompt_set(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line {line}:"), message
    assert re.search(match, message), message


def test_unknown_names_and_files():
    with pytest.raises(ValueError) as error:
        load_prompt_set("nudiity")
    assert "nudity" in str(error.value) and "vangogh" in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_prompt_set("missing.csv")
    with pytest.raises(ValueError, match=r"'\.csv'"):
        load_prompt_set(__file__)  # an existing file of an unsupported type


def test_builtin_sets_exist_with_expected_sizes():
    names = builtin_prompt_sets()
    assert set(names) == {"nudity", "vangogh", "church", "parachute", "garbage_truck", "tench",
                          "circle", "square", "triangle", "star", "cross"}
    for name in names:
        prompts = load_prompts_csv(BUILTIN_DIR / f"{name}.csv")
        toy = name in ("circle", "square", "triangle", "star", "cross")  # >= 32: an ASR step of 3 points or less
        assert len(prompts) >= (32 if toy else 30 if name == "nudity" else 20), name
        assert len(set(prompts.prompts)) == len(prompts), f"{name} has duplicate prompts"
        assert all(record.seed is not None for record in prompts), name


@pytest.mark.parametrize("concept,word", [("vangogh", "van gogh"), ("church", "church"),
                                          ("parachute", "parachute"), ("garbage_truck", "garbage truck"),
                                          ("tench", "tench")])
def test_object_and_style_sets_name_their_concept(concept, word):
    prompts = load_prompt_set(concept)
    assert all(word in prompt.lower() for prompt in prompts.prompts)
    assert all(record.guidance == 7.5 for record in prompts)


TOY = re.compile(  # stereo.toy.scenes' templates: the world's whole grammar
    r"^(a (?P<s0>\w+)"
    r"|a (?P<s1>\w+) on a (?P<b1>\w+) background"
    r"|a (?P<c>\w+) (?P<s>\w+)"
    r"|a photo of a (?P<c2>\w+) (?P<s2>\w+)"
    r"|a (?P<c3>\w+) (?P<s3>\w+) on a (?P<b3>\w+) background"
    r"|a (?P<c6>\w+) (?P<s6>\w+) and a (?P<c7>\w+) (?P<s7>\w+)"
    r"|a (?P<c4>\w+) (?P<s4>\w+) and a (?P<c5>\w+) (?P<s5>\w+) on a (?P<b4>\w+) background)$"
)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star", "cross"])
def test_toy_sets_follow_the_grammar(shape):
    colours, shapes = {"red", "green", "blue", "yellow", "purple"}, {"circle", "square", "triangle", "star", "cross"}
    backgrounds = {"plain", "striped", "dotted"}
    prompts = load_prompt_set(shape)
    for prompt in prompts.prompts:
        match = TOY.match(prompt)
        assert match, prompt
        found = {k: v for k, v in match.groupdict().items() if v}
        assert {v for k, v in found.items() if k.startswith("c")} <= colours, prompt
        assert {v for k, v in found.items() if k.startswith("s")} <= shapes, prompt
        assert {v for k, v in found.items() if k.startswith("b")} <= backgrounds, prompt
        assert shape in found.values(), prompt
    assert {record.categories for record in prompts} == {("toy", shape)}
