"""Recipes: YAML files with ``base:`` inheritance and dotted command-line overrides.

A recipe names its base (a path relative to itself) and changes only what its ablation is about;
``key.sub=value`` overrides are applied last, values parsed as YAML (``true``, ``4``, ``null``).
The project's recipes (``recipes/`` of a checkout) ship inside the package too
(``mtp_megatron/recipes``), so ``recipes/demo.yaml`` or ``demo`` names one from anywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtp_megatron.config import ConfigError, DataConfig, ModelConfig, TrainConfig, from_dict
from mtp_megatron.config.base import check_choice
from mtp_megatron.config.mtp import HeadInit
from mtp_megatron.parallel.dims import ParallelConfig, ParallelDims, check_model_layout


@dataclass
class Recipe:
    """One experiment: everything a run needs, loaded from YAML."""

    name: str = "unnamed"
    """Run name (TensorBoard and run directories use it)."""
    description: str = ""
    """What this ablation changes and why."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture and MTP heads."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, ZeRO, logging, checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, split, tokenizer cache."""
    init_from: str | None = None
    """'hf:DIR': start from a pretrained Hugging Face checkpoint (Llama, Qwen2, Qwen3, OLMo-2,
    Exaone4). Its config.json sets the trunk's architecture (the model section keeps the MTP
    heads, ETD, max_seq_len and padding), its weights the trunk's, its tokenizer the data's
    (unless data.tokenizer or a data.train blend is set). None: train from scratch."""
    mtp_head_init: HeadInit = "random"
    """With init_from: the MTP heads' blocks 'random', or 'last_layer' (copies of the trunk's
    last layer and final norm, the usual start of MTP fine-tuning; transformer heads)."""

    def _check_trunk_training(self) -> None:
        """``train.mtp`` against the model and layout (after each section validated)."""
        curriculum = self.train.mtp.curriculum
        if curriculum != "none" and self.model.mtp is None:
            raise ConfigError(
                f"train.mtp.curriculum={curriculum!r} needs MTP heads (model.mtp is null); "
                "set it to 'none' or add model.mtp"
            )
        mtp = self.model.mtp
        if curriculum != "none" and mtp is not None:
            stages = mtp.num_predict_tokens + 1
            span = self.train.mtp.curriculum_span(self.train.steps) or 0
            if span < stages:
                raise ConfigError(
                    f"train.mtp.curriculum={curriculum!r} spans {span} steps "
                    f"(train.mtp.curriculum_steps, else train.steps), fewer than its {stages} "
                    "stages (K + 1): some stages would never train; give it at least "
                    f"{stages} steps"
                )
        trunk, pp = self.train.mtp.trunk, self.parallel.pipeline_parallel_size
        if trunk == "joint":
            return
        if self.model.mtp is None:
            raise ConfigError(f"train.mtp.trunk={trunk!r} needs MTP heads (model.mtp is null)")
        if self.model.mtp.mtp_head_type == "shared_lm_head":
            raise ConfigError(
                f"train.mtp.trunk={trunk!r} with the parameter-free shared_lm_head: nothing "
                "would learn from the MTP loss; use 'joint' or a head with parameters"
            )
        if pp > 1:
            why = (
                "the last stage reads the tied embedding detached, so only the first stage "
                "would enter DeepSpeed's all-reduce of its gradient"
                if trunk == "detach_heads"
                else "frozen parameters on DeepSpeed's pipeline engine are untested here"
            )
            raise ConfigError(
                f"train.mtp.trunk={trunk!r} with pipeline_parallel_size={pp} is not supported "
                f"yet ({why}); use pipeline_parallel_size=1"
            )
        if trunk == "detach_heads" and self.train.zero_stage == 3:
            raise ConfigError(
                "train.mtp.trunk='detach_heads' with train.zero_stage=3 is not supported: the "
                "heads read the output weight outside ZeRO-3's gather; use zero_stage 1 or 2"
            )
        if trunk == "freeze_trunk" and self.model.etd is not None:
            raise ConfigError(
                "train.mtp.trunk='freeze_trunk' with model.etd: ETD's LoRA experts and routers "
                "are part of the trunk and would not train (and the routing bias still moves); "
                "use 'joint' or 'detach_heads'"
            )

    def dims(self, world: int) -> ParallelDims:
        """This recipe's layout over ``world`` processes (ConfigError if they do not split)."""
        return ParallelDims.from_config(self.parallel, world)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    def validate(self) -> None:
        check_choice("mtp_head_init", self.mtp_head_init, HeadInit)
        if self.mtp_head_init != "random" and self.init_from is None:
            raise ConfigError("mtp_head_init='last_layer' needs init_from (a pretrained trunk)")
        mtp = self.model.mtp
        if self.mtp_head_init == "last_layer" and (
            mtp is None or mtp.mtp_head_type != "transformer"
        ):
            raise ConfigError(
                "mtp_head_init='last_layer' copies the trunk's last layer into each head's "
                "decoder layer: it needs model.mtp.mtp_head_type='transformer'"
            )
        self.parallel.validate()
        check_model_layout(self.model, self.parallel)
        self.train.validate()
        self.data.validate()
        self._check_trunk_training()
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.seq_len} is invalid: longer than model.max_seq_len "
                f"({self.model.max_seq_len}); raise max_seq_len or shorten seq_len"
            )
        pp = self.parallel.pipeline_parallel_size
        if self.train.zero_stage in (2, 3) and pp > 1:
            raise ConfigError(
                f"train.zero_stage={self.train.zero_stage} is invalid with "
                f"parallel.pipeline_parallel_size={pp}: with pipeline parallelism DeepSpeed runs "
                "ZeRO 0 and 1 only. Its pipeline engine reduces gradients itself once all "
                "micro-batches are through, which ZeRO-2 (gradients reduce-scattered during "
                "backward) and ZeRO-3 (parameters partitioned and gathered per forward) cannot "
                "follow; use train.zero_stage=1 (optimizer states sharded over data parallel) "
                "or 0, or pipeline_parallel_size=1 for ZeRO 2/3"
            )
        if self.train.zero_stage == 0 and pp > 1 and self.train.grad_clip > 0:
            raise ConfigError(
                f"train.zero_stage=0 with parallel.pipeline_parallel_size={pp} is invalid while "
                f"train.grad_clip={self.train.grad_clip}: without ZeRO, DeepSpeed's pipeline "
                "engine computes the clipping norm over the wrong parameters (the embedding "
                "tied across the first and last stage twice, the replicated norm weights of "
                "every stage after the first not at all), so clipping would differ from PP=1; "
                "use train.zero_stage=1 (exact norm) or train.grad_clip=0"
            )
        if self.train.zero_stage == 3 and self.model.tie_embeddings:
            raise ConfigError(
                "train.zero_stage=3 is invalid with model.tie_embeddings=true: ZeRO-3 gathers a "
                "parameter only inside its own module, and the tied output layer reads the "
                "embedding's weight from another; untie the embeddings or use ZeRO 0-2"
            )


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


RECIPES = Path(__file__).resolve().parent / "recipes"
"""The project's recipes: the checkout's ``recipes/`` (linked) or the installed package's copy."""
DEMO_RECIPE = RECIPES / "demo.yaml"
"""What ``make demo`` trains."""


def find_recipe(path: str | Path) -> Path:
    """``path`` if it is a file; else the project's recipe it names ('recipes/demo.yaml' from
    outside a checkout, 'ablations/ntp.yaml', or a bare 'demo'). Raises ConfigError."""
    given = Path(path)
    if given.is_file():
        return given
    relative = Path(*given.parts[1:]) if given.parts[:1] == ("recipes",) else given
    for candidate in (RECIPES / relative, RECIPES / relative.with_suffix(".yaml")):
        if not given.is_absolute() and candidate.is_file():
            return candidate
    raise ConfigError(
        f"recipe '{given.resolve()}' does not exist; recipes live in recipes/ (*.yaml): a path, "
        "or the name of one of the project's, e.g. demo or ablations/ntp"
    )


def load_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and its chain of bases into one merged dict (without the ``base`` key)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist; recipes live in recipes/ (*.yaml)")
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"recipe bases form a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(load_recipe_dict(path.parent / base, (*_seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; the path must exist unless its parent is a free mapping."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = node[part]
        node[parts[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge, override, type-check and validate a recipe: every error surfaces here."""
    path = find_recipe(path)
    data = apply_overrides(load_recipe_dict(path), overrides or [])
    data.setdefault("name", path.stem)
    recipe = from_dict(Recipe, data)
    if recipe.init_from is not None:
        _take_pretrained_architecture(recipe, recipe.init_from)
    recipe.validate()
    return recipe


def _take_pretrained_architecture(recipe: Recipe, init_from: str) -> None:
    """``init_from: hf:DIR``: the trunk's architecture and (by default) the tokenizer are the
    checkpoint's, resolved here so that every check before launch sees them."""
    from mtp_megatron.hf.importer import architecture, hf_directory

    folder = hf_directory(init_from)
    recipe.model, _ = architecture(folder, recipe.model)
    if recipe.data.tokenizer is None and recipe.data.train is None:
        recipe.data.tokenizer = str(folder)
