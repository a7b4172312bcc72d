"""FLUX LoRA recipe -> ostris/ai-toolkit job config (see ../shared/reference/ai-toolkit.md §1).

ai-toolkit's code defaults are wrong for FLUX (noise_scheduler ddpm, lr 1e-6, dtype fp32, no
training_folder), so every key that matters is written explicitly. The config is built as a dict
and serialised with yaml.safe_dump / json.dumps: user text is only ever a scalar value, never a
template fragment, so it cannot change the structure of the document.

Two more traps of the trainer that validation guards against:
- ai-toolkit replaces `${VAR}` in the config *file text* with environment variables before parsing, so
  a prompt containing `${HF_TOKEN}` would leak the token into samples' metadata; `$` is refused in all
  user text.
- A re-used `config.name` silently resumes the old run (§3), so `job_name` is a required argument of
  rendering and the caller makes it unique per job (e.g. "lora_<jobid>").
- ai-toolkit replaces `[name]` across the whole config with the job name (`lora_<jobid>`, not the
  LoRA's name), so `[name]` is refused in prompts.

Alpha: for FLUX ai-toolkit always saves in peft format and sets alpha = rank whatever
`linear_alpha` says (toolkit/lora_special.py), so `linear_alpha` is rendered equal to the rank and
any other alpha is refused rather than silently ignored.
The recipe's seed seeds both sampling and training (`training_seed`), so runs are reproducible.

Presets (values documented here and in PRESETS):
- character: a person, pet or object. rank 16/alpha 16, lr 1e-4, 1500 steps, adamw8bit, batch 1,
  resolutions 512/768/1024, caption dropout 0.05, save and sample every 250 steps.
- style: an art style. rank 32/alpha 32, lr 1e-4, 2500 steps, caption dropout 0.10 (the style should
  come through without the trigger too), sample every 500 steps, style-oriented prompts.
- fast: a quick try. rank 16/alpha 16, lr 4e-4 (Replicate's default), 500 steps, resolutions 512/768,
  no baseline samples, save and sample every 250 steps.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Format = Literal["yaml", "json"]
BaseModelName = Literal["dev", "schnell"]
Optimizer = Literal["adamw8bit", "adamw", "adam8bit", "lion8bit", "prodigy", "adafactor"]

# Hugging Face repos of the two base models and schnell's required training adapter (§1).
MODEL_REPOS: dict[str, str] = {
    "dev": "black-forest-labs/FLUX.1-dev",
    "schnell": "black-forest-labs/FLUX.1-schnell",
}
SCHNELL_ADAPTER = "ostris/FLUX.1-schnell-training-adapter"
# Sampling defaults of the two example configs: dev guidance 4 / 20 steps, schnell 1 / 4 steps.
SAMPLE_DEFAULTS: dict[str, tuple[float, int]] = {"dev": (4.0, 20), "schnell": (1.0, 4)}

MAX_PROMPTS = 8
MAX_PROMPT_LEN = 400

# A trigger is one token-ish word or a short phrase: letters/digits/_-. with single inner spaces.
# No brackets ([trigger]/[name] are substitution tokens), no $ (env substitution), no quotes/colons.
_TRIGGER_RE = re.compile(r"^[^\W_](?:[\w.-]| (?! ))*$")
_NAME_RE = re.compile(r"^[^\W_](?:[\w.-]| (?! ))*$")
# job_name becomes a folder and file name on the remote box: ASCII only, no separators.
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
# absolute remote paths: plain characters only, so they are safe in any context on the box
_REMOTE_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecipeError(ValueError):
    """A recipe value or render argument was refused. The message is one line."""


def _check_text(value: str, what: str) -> str:
    if "$" in value:
        raise ValueError(f"{what} must not contain '$' (ai-toolkit expands ${{VAR}} in config files)")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{what} must be a single line without control characters")
    return value


class FluxRecipe(BaseModel):
    """What to train. Validated on construction; every value has a range that ai-toolkit handles."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    name: str = Field(min_length=1, max_length=64, description="human label, stored in the LoRA metadata")
    trigger_word: str = Field(min_length=1, max_length=48)
    steps: int = Field(default=1500, ge=1, le=10000)
    rank: int = Field(default=16, ge=1, le=128)
    alpha: int = Field(default=0, ge=0, le=256, description="0 or the rank: ai-toolkit trains FLUX at alpha = rank")
    learning_rate: float = Field(default=1e-4, gt=0, le=10.0)
    batch_size: int = Field(default=1, ge=1, le=8)
    resolutions: list[int] = Field(default_factory=lambda: [512, 768, 1024], min_length=1, max_length=4)
    optimizer: Optimizer = "adamw8bit"
    caption_dropout: float = Field(default=0.05, ge=0.0, le=0.5)
    save_every: int = Field(default=250, ge=1, le=10000)
    max_saves_to_keep: int = Field(default=4, ge=1, le=20)
    sample_every: int = Field(default=250, ge=0, le=10000, description="0 disables sampling")
    sample_prompts: list[str] = Field(default_factory=list, max_length=MAX_PROMPTS)
    sample_size: int = Field(default=1024, ge=256, le=1536, multiple_of=64)
    skip_first_sample: bool = False
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    base_model: BaseModelName = "dev"
    # a local diffusers folder or another repo id (e.g. a pre-downloaded copy, see §7.5)
    model_path: str | None = Field(default=None, max_length=200)
    quantize: bool = True
    use_ema: bool = True

    @field_validator("trigger_word")
    @classmethod
    def _trigger(cls, v: str) -> str:
        _check_text(v, "trigger word")
        if not _TRIGGER_RE.match(v):
            raise ValueError(
                "trigger word must start with a letter or digit and use only letters, digits, '_', '-', "
                "'.' and single spaces"
            )
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_text(v, "name")
        if not _NAME_RE.match(v):
            raise ValueError(
                "name must start with a letter or digit and use only letters, digits, '_', '-', '.' "
                "and single spaces"
            )
        return v

    @field_validator("sample_prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        out = []
        for i, prompt in enumerate(v, 1):
            _check_text(prompt, f"sample prompt {i}")
            prompt = prompt.strip()
            if not prompt:
                raise ValueError(f"sample prompt {i} is empty")
            if len(prompt) > MAX_PROMPT_LEN:
                raise ValueError(f"sample prompt {i} is longer than {MAX_PROMPT_LEN} characters")
            if "[name]" in prompt:
                raise ValueError(
                    f"sample prompt {i} must not contain [name] (ai-toolkit replaces it with the job's internal "
                    "name, not the LoRA's); use [trigger] for the trigger word"
                )
            out.append(prompt)
        return out

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, v: list[int]) -> list[int]:
        for r in v:
            if not 256 <= r <= 1536 or r % 64:
                raise ValueError(f"resolution {r} must be a multiple of 64 between 256 and 1536")
        if len(set(v)) != len(v):
            raise ValueError("resolutions must not repeat")
        return sorted(v)

    @field_validator("model_path")
    @classmethod
    def _model_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("/"):
            _check_remote_path(v, "model path")
        elif not _REPO_ID_RE.match(v):
            raise ValueError("model path must be an absolute path or a Hugging Face repo id 'owner/name'")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.alpha not in (0, self.rank):
            raise ValueError(
                f"alpha must equal the rank ({self.rank}): ai-toolkit trains FLUX LoRAs with alpha = rank "
                f"and would ignore alpha {self.alpha}"
            )
        object.__setattr__(self, "alpha", self.rank)
        if self.optimizer.startswith("prodigy"):
            if not 0.1 <= self.learning_rate <= 10.0:
                raise ValueError("learning_rate for prodigy must be between 0.1 and 10 (it adapts; use 1.0)")
        elif not 1e-6 <= self.learning_rate <= 1e-2:
            raise ValueError(f"learning_rate must be between 1e-06 and 0.01 for {self.optimizer}")
        return self

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> FluxRecipe:
        """A preset's values with `overrides` on top; None overrides are ignored (unset CLI flags).

        Raises RecipeError (one line) for an unknown preset or a refused value.
        """
        if preset not in PRESETS:
            raise RecipeError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        values = dict(PRESETS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("sample_prompts", list(DEFAULT_PROMPTS[preset]))
        try:
            return cls(**values)
        except ValidationError as exc:
            raise RecipeError(describe_error(exc)) from None

    @property
    def model_name_or_path(self) -> str:
        return self.model_path or MODEL_REPOS[self.base_model]


PRESETS: dict[str, dict[str, Any]] = {
    "character": {
        "steps": 1500,
        "rank": 16,
        "learning_rate": 1e-4,
        "batch_size": 1,
        "resolutions": [512, 768, 1024],
        "optimizer": "adamw8bit",
        "caption_dropout": 0.05,
        "save_every": 250,
        "sample_every": 250,
    },
    "style": {
        "steps": 2500,
        "rank": 32,
        "learning_rate": 1e-4,
        "batch_size": 1,
        "resolutions": [512, 768, 1024],
        "optimizer": "adamw8bit",
        "caption_dropout": 0.10,
        "save_every": 500,
        "sample_every": 500,
    },
    "fast": {
        "steps": 500,
        "rank": 16,
        "learning_rate": 4e-4,
        "batch_size": 1,
        "resolutions": [512, 768],
        "optimizer": "adamw8bit",
        "caption_dropout": 0.05,
        "save_every": 250,
        "sample_every": 250,
        "skip_first_sample": True,
    },
}

# `[trigger]` is replaced by ai-toolkit; sample prompts do not get the trigger added otherwise (§1).
DEFAULT_PROMPTS: dict[str, tuple[str, ...]] = {
    "character": (
        "a photo of [trigger], portrait, soft window light",
        "[trigger] standing in a park, full body, golden hour",
        "a painting of [trigger] in the style of an oil portrait",
    ),
    "style": (
        "a lighthouse on a cliff at dusk, [trigger] style",
        "a portrait of an old sailor, [trigger] style",
        "a busy city street in the rain, [trigger] style",
    ),
    "fast": ("a photo of [trigger]", "[trigger] in a forest, cinematic lighting"),
}


def describe_error(exc: ValidationError) -> str:
    """One line naming the field and the rule of the first validation error (the input is echoed
    only when it is a number, never user text)."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    value = err.get("input")
    got = f" (got {value})" if isinstance(value, int | float) and not isinstance(value, bool) else ""
    # model-level checks have no location; their message names the field itself
    return f"{loc}: {msg}{got}" if loc else f"{msg}{got}"


def _check_remote_path(path: str, what: str) -> str:
    if not _REMOTE_PATH_RE.match(path):
        raise RecipeError(f"{what} must be an absolute path of letters, digits and _ . / - (got {path!r})")
    if ".." in path.split("/"):
        raise RecipeError(f"{what} must not contain '..'")
    return posixpath.normpath(path)


def check_job_name(job_name: str) -> str:
    if not _JOB_NAME_RE.match(job_name):
        raise RecipeError(
            "job name must be 1-80 ASCII letters, digits, '_', '.' or '-' and start with a letter or digit"
        )
    return job_name


def config_dict(recipe: FluxRecipe, *, job_name: str, dataset_dir: str, training_folder: str) -> dict[str, Any]:
    """The ai-toolkit job config as a plain dict (`job: extension`, one `sd_trainer` process)."""
    check_job_name(job_name)
    dataset_dir = _check_remote_path(dataset_dir, "dataset dir")
    training_folder = _check_remote_path(training_folder, "training folder")
    guidance, sample_steps = SAMPLE_DEFAULTS[recipe.base_model]
    sampling = recipe.sample_every > 0 and bool(recipe.sample_prompts)

    model: dict[str, Any] = {
        "name_or_path": recipe.model_name_or_path,
        "is_flux": True,
        "quantize": recipe.quantize,
    }
    if recipe.base_model == "schnell":
        model["assistant_lora_path"] = SCHNELL_ADAPTER  # required for schnell (§1)

    train: dict[str, Any] = {
        "batch_size": recipe.batch_size,
        "steps": recipe.steps,
        "gradient_accumulation_steps": 1,
        "train_unet": True,
        "train_text_encoder": False,
        "gradient_checkpointing": True,
        "noise_scheduler": "flowmatch",
        "optimizer": recipe.optimizer,
        "lr": recipe.learning_rate,
        "ema_config": {"use_ema": recipe.use_ema, "ema_decay": 0.99},
        "dtype": "bf16",
        "skip_first_sample": recipe.skip_first_sample,
        "disable_sampling": not sampling,
    }

    process: dict[str, Any] = {
        "type": "sd_trainer",  # the CLI trainer; ui_trainer needs the UI's database (§6, #276)
        "training_folder": training_folder,
        "device": "cuda:0",
        "training_seed": recipe.seed,  # without it training is unseeded; `seed` below seeds samples only
        "trigger_word": recipe.trigger_word,
        # alpha = rank: what ai-toolkit does for FLUX anyway, written so the config says what is trained
        "network": {"type": "lora", "linear": recipe.rank, "linear_alpha": recipe.rank},
        "save": {
            "dtype": "float16",
            "save_every": recipe.save_every,
            "max_step_saves_to_keep": recipe.max_saves_to_keep,
            "push_to_hub": False,  # pushing would prompt for a login on a headless box (§5)
        },
        "datasets": [
            {
                "folder_path": dataset_dir,
                "caption_ext": "txt",
                "caption_dropout_rate": recipe.caption_dropout,
                "shuffle_tokens": False,
                "cache_latents_to_disk": True,
                "resolution": list(recipe.resolutions),
            }
        ],
        "train": train,
        "model": model,
    }
    if sampling:
        process["sample"] = {
            "sampler": "flowmatch",
            "sample_every": recipe.sample_every,
            "width": recipe.sample_size,
            "height": recipe.sample_size,
            "prompts": list(recipe.sample_prompts),
            "neg": "",
            "seed": recipe.seed,
            "walk_seed": True,
            "guidance_scale": guidance,
            "sample_steps": sample_steps,
        }
    return {
        "job": "extension",
        "config": {"name": job_name, "process": [process]},
        "meta": {"name": recipe.name, "version": "1.0", "trigger_word": recipe.trigger_word},
    }


def render_config(
    recipe: FluxRecipe,
    *,
    job_name: str,
    dataset_dir: str,
    training_folder: str,
    fmt: Format = "yaml",
) -> str:
    """The job config as YAML (safe_dump) or JSON text, ready to write to a file on the box."""
    doc = config_dict(recipe, job_name=job_name, dataset_dir=dataset_dir, training_folder=training_folder)
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    raise RecipeError(f"unknown format {fmt!r}; use yaml or json")


class ExpectedOutputs(BaseModel):
    """Where ai-toolkit writes a job's files (§3)."""

    model_config = ConfigDict(frozen=True)

    output_dir: str  # <training_folder>/<job_name>
    final_lora: str  # <output_dir>/<job_name>.safetensors: its presence confirms success
    checkpoint_glob: str  # <output_dir>/<job_name>_*.safetensors (step:09d suffix)
    samples_dir: str  # <output_dir>/samples, files <ms-epoch>__<step:09d>_<i>.jpg
    config_copy: str  # <output_dir>/config.yaml, written at start


def expected_outputs(job_name: str, training_folder: str) -> ExpectedOutputs:
    check_job_name(job_name)
    out = posixpath.join(_check_remote_path(training_folder, "training folder"), job_name)
    return ExpectedOutputs(
        output_dir=out,
        final_lora=f"{out}/{job_name}.safetensors",
        checkpoint_glob=f"{out}/{job_name}_[0-9]*.safetensors",
        samples_dir=f"{out}/samples",
        config_copy=f"{out}/config.yaml",
    )
