"""Hugging Face model folders in and out, and the hub when the machine is online.

In: ``config.json`` + weights (``model.safetensors``, shards listed in
``model.safetensors.index.json``, or a legacy ``pytorch_model.bin`` read with
``torch.load(weights_only=True)``: never a plain unpickle) + tokenizer files. The family named by
``config.json`` converts the config and the weight names (see ``families.py``).

Out: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files,
which ``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load with no missing or unexpected weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from zenlm.errors import InteropError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InteropError(f"{folder}/config.json is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise InteropError(f"{folder}/config.json is not a JSON object")
    return config


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise InteropError(f"weights file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError: truncated or not a safetensors file
        raise InteropError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def _load_bin(path: Path) -> dict:
    import pickle

    import torch

    if not path.is_file():
        raise InteropError(f"weights file missing: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InteropError(f"refused {path}: it holds more than tensors, and zenlm never unpickles "
                           f"arbitrary objects ({str(exc).splitlines()[0][:120]})") from None
    except Exception as exc:
        raise InteropError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise InteropError(f"{path} does not hold a state dict")
    return state


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InteropError(f"{index} is not a weight index (no weight_map)") from None
    return sorted(set(weight_map.values()))


def read_weights(folder: Path) -> dict:
    """Every tensor of the checkpoint in ``folder``, safetensors preferred over ``.bin``."""
    state: dict = {}
    if (folder / "model.safetensors.index.json").is_file():
        for shard in _shards(folder / "model.safetensors.index.json"):
            state.update(_load_safetensors(folder / shard))
    elif (folder / "model.safetensors").is_file():
        state = _load_safetensors(folder / "model.safetensors")
    elif any(folder.glob("*.safetensors")):
        for f in sorted(folder.glob("*.safetensors")):
            state.update(_load_safetensors(f))
    elif (folder / "pytorch_model.bin.index.json").is_file():
        for shard in _shards(folder / "pytorch_model.bin.index.json"):
            state.update(_load_bin(folder / shard))
    elif (folder / "pytorch_model.bin").is_file():
        state = _load_bin(folder / "pytorch_model.bin")
    else:
        raise InteropError(f"no weights in {folder}: expected model.safetensors (or shards listed "
                           f"in model.safetensors.index.json) or pytorch_model.bin")
    return state


def build_model(family, hf_config: dict[str, Any], hf_state: dict, *, source: str, dtype=None,
                device: str = "cpu", max_seq_len: int | None = None):
    """The zenlm Transformer for an HF-style config + HF-named weights (also used for GGUF)."""
    import dataclasses

    from zenlm.model import Transformer

    config = family.config_from_hf(hf_config)
    if max_seq_len is not None:
        config = dataclasses.replace(config, max_seq_len=min(int(max_seq_len), config.max_seq_len))
    dtype = _dtype(dtype)
    weights = family.weights_from_hf(hf_state, config)
    weights = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in weights.items()}
    try:
        return Transformer.from_weights(config, weights)
    except KeyError as exc:
        raise InteropError(f"{source} does not fit its config: {exc.args[0]}") from None
    except RuntimeError as exc:
        lines = [l.strip() for l in str(exc).splitlines() if "size mismatch" in l] or str(exc).splitlines()
        raise InteropError(f"{source} does not fit its config: {lines[0][:200]}") from None


def _dtype(dtype):
    import torch

    if dtype is None:
        # fp32 on every machine: bf16 weights are slow where the CPU only emulates bf16, and
        # where it is native, what runs the model switches to it itself (dtype "auto":
        # zenlm.hardware.resolve_dtype) without the stored weights losing precision
        return torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise InteropError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
        return getattr(torch, dtype)
    return dtype


def embedding_spec(folder: str | os.PathLike, config):
    """How ``folder``'s model makes sentence vectors (``zenlm.infer.embed.EmbedSpec``): what a
    sentence-transformers folder declares (``modules.json``, ``1_Pooling/config.json``,
    ``sentence_bert_config.json``), else an encoder's ``[CLS]`` state; None for a decoder."""
    from zenlm.infer.embed import EmbedSpec

    folder = Path(folder)
    if config.causal:
        return None
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return EmbedSpec(pooling="cls", normalize=False)
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
        pool_cfg = {}
        if "Pooling" in kinds and (folder / kinds["Pooling"] / "config.json").is_file():
            pool_cfg = json.loads((folder / kinds["Pooling"] / "config.json").read_text(encoding="utf-8"))
        st_cfg = {}
        if (folder / "sentence_bert_config.json").is_file():
            st_cfg = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, AttributeError, TypeError):
        raise InteropError(f"{folder} has a sentence-transformers config that is not valid JSON") from None
    if pool_cfg.get("pooling_mode_cls_token"):
        pooling = "cls"
    elif pool_cfg.get("pooling_mode_mean_tokens", "Pooling" in kinds):
        pooling = "mean"
    else:
        modes = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v]
        raise InteropError(f"{folder} pools with {', '.join(modes) or 'nothing'}; zenlm computes "
                           f"mean and cls pooling")
    return EmbedSpec(pooling=pooling, normalize="Normalize" in kinds,
                     max_length=st_cfg.get("max_seq_length"))


def load_hf_folder(folder: str | os.PathLike, *, device: str = "cpu", dtype=None,
                   max_seq_len: int | None = None):
    """(eval-mode model, tokenizer or None) from a Hugging Face folder (or hub snapshot)."""
    from zenlm.interop.registry import hf_family
    from zenlm.tokenizer import Tokenizer

    folder = Path(folder)
    config = read_config(folder)
    from zenlm.interop.marian import is_marian, load_marian

    if is_marian(config):  # an encoder-decoder (zenlm.model.seq2seq), not a family of Transformer
        model = load_marian(folder, config, read_weights(folder), device=device, dtype=dtype)
        has_tokenizer = (folder / "tokenizer.json").is_file()
        return model, (Tokenizer.from_hf_folder(folder) if has_tokenizer else None)
    family = hf_family(config)  # refuses unknown architectures before reading any weights
    state = read_weights(folder)
    model = build_model(family, config, state, source=str(folder), dtype=dtype, device=device,
                        max_seq_len=max_seq_len)
    if "BertForSequenceClassification" in (config.get("architectures") or []):
        model = _bert_sequence_classifier(model, config, state, str(folder))
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    tokenizer = Tokenizer.from_hf_folder(folder) if has_tokenizer else None
    return model, tokenizer


def _bert_sequence_classifier(backbone, config: dict[str, Any], state: dict, source: str):
    """A :class:`~zenlm.model.heads.Classifier` reading BERT's pooler through its
    ``classifier`` layer (weight and bias), labelled as the config's ``id2label``."""
    from zenlm.model.heads import Classifier

    if "classifier.weight" not in state:
        raise InteropError(f"{source} is a BertForSequenceClassification without classifier weights")
    weight = state["classifier.weight"]
    id2label = config.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(weight.shape[0])]
    clf = Classifier(backbone, labels, pooling="pooler", bias=True)
    p = backbone.tok_emb.weight
    clf.head.score.weight.data = weight.to(p.device, p.dtype).clone()
    clf.head.score.bias.data = state["classifier.bias"].to(p.device, p.dtype).clone()
    return clf.eval()


# ----------------------------------------------------------------------------------------------
# the hub


def _offline(hub) -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(getattr(hub.constants, "HF_HUB_OFFLINE", False))


def fetch_hub(repo_id: str, revision: str | None = None) -> Path:
    """A local snapshot of a hub model: from the cache, else downloaded when online."""
    how = (f"download it on a connected machine (huggingface-cli download {repo_id} --local-dir "
           f"DIR) and pass zenlm.load('DIR')")
    try:
        import huggingface_hub as hub
    except ImportError:
        raise InteropError(f"no local folder '{repo_id}'; fetching it as a hub id needs "
                           f"huggingface_hub (pip install huggingface_hub), or {how}") from None
    patterns = ["config.json", "generation_config.json", *TOKENIZER_FILES, "*.safetensors",
                "model.safetensors.index.json"]
    try:  # already in the local cache: no network needed
        path = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          local_files_only=True))
        if is_hf_folder(path):
            return path
    except Exception:
        pass
    if _offline(hub):
        raise InteropError(f"no local folder '{repo_id}', and as a hub id it is not in the local "
                           f"Hugging Face cache ({hub.constants.HF_HUB_CACHE}) while the machine is "
                           f"offline (HF_HUB_OFFLINE): {how}")
    try:
        files = hub.list_repo_files(repo_id, revision=revision)
        if not any(f.endswith(".safetensors") for f in files):  # an old repo: legacy .bin only
            patterns += ["pytorch_model.bin", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hub.errors.RepositoryNotFoundError:
        raise InteropError(f"no local folder '{repo_id}', and no such hub model (or it is private: "
                           f"log in with huggingface-cli login)") from None
    except Exception as exc:  # no route to the hub, timeouts, gated repos
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise InteropError(f"no local folder '{repo_id}', and fetching it from the hub failed "
                           f"({reason}): {how}") from None


# ----------------------------------------------------------------------------------------------
# export


def export_hf(model, tokenizer, out_dir: str | os.PathLike, *, dtype=None) -> Path:
    """Write ``model`` (and ``tokenizer``, if given) as a Hugging Face folder.

    A model with LoRA adapters is written merged; a classifier (``model/heads.py``) is written
    as the family's ``*ForSequenceClassification``. Each file is written atomically (a crash
    leaves every file whole, old or new). The signed lineage card is :func:`zenlm.export_hf`'s
    to add: the card records where a model came from, which the loader knows and this writer
    does not (and the card's floor sits above interop).
    """
    from safetensors.torch import save_file

    from zenlm.interop.registry import hf_family_for
    from zenlm.io import atomic_output, atomic_write_json

    from zenlm.model.lora import merged_state_dict

    if hasattr(model, "encoder") and hasattr(model, "decode"):  # an encoder-decoder: Marian's layout
        from zenlm.interop.marian import export_marian

        return export_marian(model, tokenizer, out_dir, dtype=_dtype(dtype))
    classifier = model if hasattr(model, "backbone") else None  # a Classifier (model/heads.py)
    if classifier is not None:
        model = classifier.backbone
    cfg = model.config
    family = hf_family_for(cfg)
    torch_dtype = _dtype(dtype)
    hf_config = family.config_to_hf(cfg)
    # LoRA adapters are folded into the weights they adapt: the export is a plain model
    state = family.weights_to_hf(merged_state_dict(model), cfg)
    specials = {"bos_token_id": None, "eos_token_id": None}  # stated, or transformers guesses
    if tokenizer is not None:
        specials = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id}
    if classifier is not None:
        _as_sequence_classifier(classifier, hf_config, state, specials)
    state = {k: v.detach().to("cpu", torch_dtype).contiguous().clone() for k, v in state.items()}
    dtype_name = str(torch_dtype).removeprefix("torch.")
    hf_config.update(specials, torch_dtype=dtype_name, dtype=dtype_name, use_cache=True)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would win
    atomic_write_json(out / "config.json", hf_config)
    generation = {**specials, "_from_model_config": True}
    atomic_write_json(out / "generation_config.json", generation)
    if tokenizer is not None:
        tokenizer.save_hf_folder(out)
    return out


def _as_sequence_classifier(classifier, hf_config: dict, state: dict, specials: dict) -> None:
    """Turn a causal-LM export into the family's sequence classifier: the LM head gives way to
    ``score`` and the config names the labels. Hugging Face pools the last token that is not
    the pad token, which is zenlm's ``last`` pooling when padding uses ``pad_token_id``."""
    from zenlm.errors import UnsupportedArchitectureError

    if not classifier.config.causal:  # BERT: the classifier reads the pooler
        if classifier.head.pooling != "pooler" or hf_config.get("model_type") != "bert":
            raise UnsupportedArchitectureError(
                f"a BERT sequence classifier reads its pooler; this one pools "
                f"{classifier.head.pooling!r} (fine-tune with --pooling pooler to export it)")
        labels = classifier.labels
        hf_config.update(architectures=["BertForSequenceClassification"], num_labels=len(labels),
                         id2label={str(i): l for i, l in enumerate(labels)},
                         label2id={l: i for i, l in enumerate(labels)})
        for key in [k for k in state if k.startswith("cls.")]:
            state.pop(key)
        for key in [k for k in state if not k.startswith("bert.")]:
            state["bert." + key] = state.pop(key)
        state["classifier.weight"] = classifier.head.score.weight
        bias = classifier.head.score.bias
        state["classifier.bias"] = bias if bias is not None else classifier.head.score.weight.new_zeros(len(labels))
        return
    if classifier.head.pooling != "last":
        raise UnsupportedArchitectureError(
            f"Hugging Face sequence classifiers pool the last token; this one pools "
            f"{classifier.head.pooling!r}")
    arch = hf_config["architectures"][0]
    hf_config["architectures"] = [arch.replace("ForCausalLM", "ForSequenceClassification")
                                  .replace("LMHeadModel", "ForSequenceClassification")]
    labels = classifier.labels
    hf_config.update(num_labels=len(labels), id2label={str(i): l for i, l in enumerate(labels)},
                     label2id={l: i for i, l in enumerate(labels)},
                     pad_token_id=specials.get("eos_token_id") or 0)
    state.pop("lm_head.weight", None)
    state["score.weight"] = classifier.head.score.weight
