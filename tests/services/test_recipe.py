"""services.recipe: every preset and edge case renders a config that ai-toolkit would read as meant."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from services.recipe import (
    DEFAULT_PROMPTS,
    PRESETS,
    SCHNELL_ADAPTER,
    FluxRecipe,
    RecipeError,
    config_dict,
    expected_outputs,
    render_config,
)

PATHS = {"job_name": "lora_42", "dataset_dir": "/workspace/lorabot/datasets/lora_42",
         "training_folder": "/workspace/lorabot/output"}

# --- a schema check mirroring the keys ai-toolkit reads (reference/ai-toolkit.md §1) -------------
TOP = {"job", "config", "meta"}
PROCESS = {"type", "training_folder", "device", "training_seed", "trigger_word", "network", "save", "datasets",
           "train", "model", "sample"}
NETWORK = {"type", "linear", "linear_alpha"}
SAVE = {"dtype", "save_every", "max_step_saves_to_keep", "push_to_hub"}
DATASET = {"folder_path", "caption_ext", "caption_dropout_rate", "shuffle_tokens", "cache_latents_to_disk",
           "resolution"}
TRAIN = {"batch_size", "steps", "gradient_accumulation_steps", "train_unet", "train_text_encoder",
         "gradient_checkpointing", "noise_scheduler", "optimizer", "lr", "ema_config", "dtype",
         "skip_first_sample", "disable_sampling"}
MODEL = {"name_or_path", "is_flux", "quantize", "assistant_lora_path"}
SAMPLE = {"sampler", "sample_every", "width", "height", "prompts", "neg", "seed", "walk_seed",
          "guidance_scale", "sample_steps"}
OPTIMIZERS = {"adamw8bit", "adamw", "adam8bit", "lion8bit", "prodigy", "adafactor"}


def _keys(d: dict[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    assert set(d) <= allowed, f"{where}: unknown keys {set(d) - allowed}"
    assert required <= set(d), f"{where}: missing {required - set(d)}"


def check_schema(doc: dict[str, Any]) -> None:
    _keys(doc, TOP, TOP, "top")
    assert doc["job"] == "extension"
    assert isinstance(doc["meta"], dict)
    cfg = doc["config"]
    assert set(cfg) == {"name", "process"} and isinstance(cfg["name"], str) and cfg["name"]
    assert isinstance(cfg["process"], list) and len(cfg["process"]) == 1
    p = cfg["process"][0]
    _keys(p, PROCESS, PROCESS - {"sample"}, "process[0]")
    assert p["type"] == "sd_trainer"  # ui_trainer fails from the CLI (#276)
    assert p["training_folder"].startswith("/")
    assert isinstance(p["trigger_word"], str) and p["trigger_word"]
    net = p["network"]
    _keys(net, NETWORK, NETWORK, "network")
    assert net["type"] == "lora" and 1 <= net["linear"] <= 128
    assert isinstance(net["linear_alpha"], int | float) and net["linear_alpha"] >= 1  # never the 1.0 default
    _keys(p["save"], SAVE, SAVE - {"push_to_hub"}, "save")
    assert p["save"]["dtype"] in {"float16", "bf16", "float32"} and p["save"].get("push_to_hub") is False
    assert isinstance(p["datasets"], list) and len(p["datasets"]) == 1
    ds = p["datasets"][0]
    _keys(ds, DATASET, {"folder_path", "caption_ext", "resolution"}, "datasets[0]")
    assert ds["folder_path"].startswith("/") and ds["caption_ext"] == "txt"
    assert 0 <= ds["caption_dropout_rate"] <= 1
    assert ds["resolution"] and all(isinstance(r, int) and r % 64 == 0 for r in ds["resolution"])
    tr = p["train"]
    _keys(tr, TRAIN, {"batch_size", "steps", "noise_scheduler", "optimizer", "lr", "dtype"}, "train")
    assert tr["noise_scheduler"] == "flowmatch" and tr["dtype"] == "bf16"  # not the ddpm/fp32 defaults
    assert tr["gradient_checkpointing"] is True and tr["optimizer"] in OPTIMIZERS
    assert isinstance(tr["lr"], float) and tr["lr"] > 1e-6 - 1e-12
    assert isinstance(tr["steps"], int) and tr["steps"] >= 1
    md = p["model"]
    _keys(md, MODEL, {"name_or_path", "is_flux", "quantize"}, "model")
    assert md["is_flux"] is True
    if "schnell" in md["name_or_path"]:
        assert md["assistant_lora_path"] == SCHNELL_ADAPTER
    if tr["disable_sampling"]:
        assert "sample" not in p
    else:
        sm = p["sample"]
        _keys(sm, SAMPLE, SAMPLE, "sample")
        assert sm["sampler"] == "flowmatch" and sm["prompts"] and sm["sample_every"] >= 1
        assert all(isinstance(x, str) for x in sm["prompts"])


def roundtrips(recipe: FluxRecipe) -> dict[str, Any]:
    """Both formats parse back to exactly the dict (so user text could not add structure)."""
    expected = config_dict(recipe, **PATHS)
    y = render_config(recipe, **PATHS, fmt="yaml")
    j = render_config(recipe, **PATHS, fmt="json")
    assert yaml.safe_load(y) == expected
    assert json.loads(j) == expected
    assert "${" not in y and "${" not in j
    check_schema(expected)
    return expected


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("base", ["dev", "schnell"])
def test_every_preset_renders_a_valid_config(preset: str, base: str) -> None:
    recipe = FluxRecipe.from_preset(preset, name="My LoRA", trigger_word="ohwx", base_model=base)
    doc = roundtrips(recipe)
    p = doc["config"]["process"][0]
    assert doc["config"]["name"] == "lora_42"
    assert p["train"]["steps"] == PRESETS[preset]["steps"]
    assert p["network"]["linear_alpha"] == p["network"]["linear"] == PRESETS[preset]["rank"]
    assert p["sample"]["prompts"] == list(DEFAULT_PROMPTS[preset])
    guidance, steps = (4.0, 20) if base == "dev" else (1.0, 4)
    assert (p["sample"]["guidance_scale"], p["sample"]["sample_steps"]) == (guidance, steps)
    assert ("assistant_lora_path" in p["model"]) == (base == "schnell")


def test_documented_preset_values() -> None:
    assert PRESETS["character"]["rank"] == 16 and PRESETS["character"]["learning_rate"] == 1e-4
    assert PRESETS["style"]["rank"] == 32 and PRESETS["style"]["caption_dropout"] == 0.10
    assert PRESETS["fast"]["steps"] == 500 and PRESETS["fast"]["learning_rate"] == 4e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps": 1, "save_every": 1, "sample_every": 1},
        {"steps": 10000, "rank": 128, "batch_size": 8},
        {"rank": 1, "alpha": 1},
        {"resolutions": [1024]},
        {"resolutions": [1536, 256, 512, 768]},
        {"sample_prompts": []},
        {"sample_every": 0},
        {"optimizer": "prodigy", "learning_rate": 1.0},
        {"learning_rate": 1e-6},
        {"caption_dropout": 0.0, "quantize": False, "use_ema": False},
        {"trigger_word": "zxc person"},
        {"trigger_word": "ÆØÅ_ñ-1.2"},
        {"name": "日本語 スタイル"},
        {"model_path": "/workspace/models/FLUX.1-dev"},
        {"model_path": "someone/FLUX.1-dev-mirror"},
    ],
)
def test_edge_cases_render_valid(overrides: dict[str, Any]) -> None:
    recipe = FluxRecipe.from_preset("character", **{"name": "n", "trigger_word": "t", **overrides})
    doc = roundtrips(recipe)
    p = doc["config"]["process"][0]
    if overrides.get("sample_prompts") == [] or overrides.get("sample_every") == 0:
        assert p["train"]["disable_sampling"] is True and "sample" not in p
    if "resolutions" in overrides:
        assert p["datasets"][0]["resolution"] == sorted(overrides["resolutions"])
    if "model_path" in overrides:
        assert p["model"]["name_or_path"] == overrides["model_path"]


def test_alpha_is_the_rank_and_any_other_alpha_is_refused() -> None:
    """ai-toolkit forces alpha = rank for FLUX: another alpha would be silently ignored (review S1-1)."""
    assert FluxRecipe(name="n", trigger_word="t", rank=32).alpha == 32
    assert FluxRecipe(name="n", trigger_word="t", rank=32, alpha=32).alpha == 32
    assert FluxRecipe.from_preset("character", name="n", trigger_word="t", rank=64).alpha == 64
    with pytest.raises(RecipeError, match=r"^alpha must equal the rank \(32\)"):
        FluxRecipe.from_preset("character", name="n", trigger_word="t", rank=32, alpha=8)
    doc = roundtrips(FluxRecipe(name="n", trigger_word="t", rank=8))
    assert doc["config"]["process"][0]["network"]["linear_alpha"] == 8


def test_name_token_in_prompts_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"\[name\]"):
        FluxRecipe.from_preset("character", name="n", trigger_word="t", sample_prompts=["a photo of [name]"])


def test_training_seed_follows_the_recipe_seed() -> None:
    doc = roundtrips(FluxRecipe.from_preset("character", name="n", trigger_word="t", seed=1234))
    p = doc["config"]["process"][0]
    assert p["training_seed"] == 1234 and p["sample"]["seed"] == 1234


INJECTIONS = [
    "[trigger]: {evil: 1}",
    "- injected item",
    "key: value # comment",
    "!!python/object/apply:os.system ['rm -rf /']",
    "&anchor *alias",
    "'single' \"double\" `back`",
    "] } { [ | > %",
    "--- ... ---",
    "a photo of [trigger]; rm -rf / && curl x | sh",
    "\\u0000 \\n literal backslashes",
    "null",
    "true",
    "123",
    "~",
]


@pytest.mark.parametrize("prompt", INJECTIONS)
def test_yaml_injection_in_prompts_stays_inert(prompt: str) -> None:
    recipe = FluxRecipe.from_preset("character", name="n", trigger_word="ohwx", sample_prompts=[prompt, "ok"])
    doc = roundtrips(recipe)
    assert doc["config"]["process"][0]["sample"]["prompts"] == [prompt, "ok"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("trigger_word", "a: b", "trigger word must start"),
        ("trigger_word", "a\nprocess: []", "single line"),
        ("trigger_word", "${HF_TOKEN}", "'$'"),
        ("trigger_word", "[name]", "trigger word must start"),
        ("trigger_word", "two  spaces", "single spaces"),
        ("trigger_word", " lead", "trigger word must start"),
        ("trigger_word", "", "at least 1 character"),
        ("trigger_word", "x" * 49, "at most 48"),
        ("trigger_word", "a'b", "trigger word must start"),
        ("name", "x\r\ny", "single line"),
        ("name", "$(id)", "'$'"),
        ("sample_prompts", ["ok", "leak ${HF_TOKEN}"], "sample prompt 2 must not contain '$'"),
        ("sample_prompts", ["line one\nline two"], "single line"),
        ("sample_prompts", ["   "], "sample prompt 1 is empty"),
        ("sample_prompts", ["x" * 401], "longer than 400"),
        ("sample_prompts", ["p"] * 9, "at most 8"),
        ("model_path", "../etc", "absolute path or a Hugging Face repo id"),
        ("model_path", "/a b", "absolute path"),
    ],
)
def test_bad_text_is_refused_with_a_clear_message(field: str, value: Any, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        FluxRecipe.from_preset("character", **{"name": "n", "trigger_word": "t", field: value})
    text = str(exc.value)
    assert message in text and "\n" not in text
    assert text.startswith(field)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps: Input should be greater than or equal to 1 (got 0)"),
        ("steps", 10001, "steps: Input should be less than or equal to 10000 (got 10001)"),
        ("rank", 129, "rank: Input should be less than or equal to 128 (got 129)"),
        ("rank", 0, "rank: Input should be greater than or equal to 1"),
        ("batch_size", 9, "batch_size: Input should be less than or equal to 8"),
        ("learning_rate", 0.5, "learning_rate must be between 1e-06 and 0.01 for adamw8bit"),
        ("learning_rate", 1e-7, "learning_rate must be between 1e-06 and 0.01"),
        ("learning_rate", -1.0, "learning_rate: Input should be greater than 0"),
        ("caption_dropout", 0.6, "caption_dropout: Input should be less than or equal to 0.5"),
        ("resolutions", [500], "resolution 500 must be a multiple of 64 between 256 and 1536"),
        ("resolutions", [2048], "resolution 2048 must be a multiple of 64"),
        ("resolutions", [512, 512], "resolutions must not repeat"),
        ("resolutions", [], "resolutions: List should have at least 1 item"),
        ("optimizer", "sgd", "optimizer: Input should be"),
        ("base_model", "pro", "base_model: Input should be 'dev' or 'schnell'"),
        ("save_every", 0, "save_every: Input should be greater than or equal to 1"),
        ("sample_size", 1000, "sample_size: Input should be a multiple of 64"),
    ],
)
def test_ranges_are_refused_with_clear_messages(field: str, value: Any, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        FluxRecipe.from_preset("character", **{"name": "n", "trigger_word": "t", field: value})
    assert message in str(exc.value)


def test_prodigy_needs_a_large_lr() -> None:
    with pytest.raises(RecipeError, match=r"prodigy must be between 0\.1 and 10"):
        FluxRecipe.from_preset("character", name="n", trigger_word="t", optimizer="prodigy")


def test_unknown_preset_and_unknown_field() -> None:
    with pytest.raises(RecipeError, match="unknown preset 'portrait'; choose one of: character"):
        FluxRecipe.from_preset("portrait", name="n", trigger_word="t")
    with pytest.raises(ValidationError):
        FluxRecipe(name="n", trigger_word="t", evil="x")  # type: ignore[call-arg]


def test_none_overrides_keep_preset_values() -> None:
    r = FluxRecipe.from_preset("style", name="n", trigger_word="t", steps=None, rank=None)
    assert (r.steps, r.rank) == (2500, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"job_name": "../x"}, "job name must be"),
        ({"job_name": "a/b"}, "job name must be"),
        ({"job_name": ""}, "job name must be"),
        ({"job_name": "x" * 81}, "job name must be"),
        ({"dataset_dir": "relative/path"}, "dataset dir must be an absolute path"),
        ({"dataset_dir": "/workspace/../etc"}, "must not contain '..'"),
        ({"training_folder": "/out/${HOME}"}, "training folder must be an absolute path"),
        ({"training_folder": "/out dir"}, "training folder must be an absolute path"),
    ],
)
def test_render_arguments_are_checked(kwargs: dict[str, str], message: str) -> None:
    recipe = FluxRecipe.from_preset("fast", name="n", trigger_word="t")
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("$", r"\$")):
        args = {**PATHS, **kwargs}
        render_config(
            recipe, job_name=args["job_name"], dataset_dir=args["dataset_dir"], training_folder=args["training_folder"]
        )


def test_render_rejects_unknown_format() -> None:
    recipe = FluxRecipe.from_preset("fast", name="n", trigger_word="t")
    with pytest.raises(RecipeError, match="unknown format"):
        render_config(recipe, **PATHS, fmt="toml")  # type: ignore[arg-type]


def test_paths_are_normalised_and_job_name_names_the_run() -> None:
    recipe = FluxRecipe.from_preset("fast", name="n", trigger_word="t")
    doc = config_dict(recipe, job_name="lora_abc", dataset_dir="/data//set/", training_folder="/out/")
    p = doc["config"]["process"][0]
    assert p["datasets"][0]["folder_path"] == "/data/set"
    assert p["training_folder"] == "/out"
    assert doc["config"]["name"] == "lora_abc"


def test_expected_outputs_follow_the_reference_layout() -> None:
    out = expected_outputs("lora_abc", "/workspace/lorabot/output/")
    assert out.final_lora == "/workspace/lorabot/output/lora_abc/lora_abc.safetensors"
    assert out.output_dir == "/workspace/lorabot/output/lora_abc"
    assert out.samples_dir == "/workspace/lorabot/output/lora_abc/samples"
    assert out.config_copy == "/workspace/lorabot/output/lora_abc/config.yaml"
    import fnmatch

    assert fnmatch.fnmatch(f"{out.output_dir}/lora_abc_000000250.safetensors", out.checkpoint_glob)
    assert not fnmatch.fnmatch(out.final_lora, out.checkpoint_glob)
    with pytest.raises(RecipeError):
        expected_outputs("a/b", "/out")
