"""Checkpoint directories in the Hugging Face layout: good ones load and reproduce logits, bad ones fail clearly."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.errors import CheckpointError, UserError

transformers = pytest.importorskip("transformers")
OPTS = RuntimeOptions(backend="native", chunk_size=8, compile=False)


def _save_hf(tmp: Path, shard: str | None = None) -> tuple[Path, object]:
    cfg = transformers.xLSTMConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_heads=2,
                                   chunk_size=16, autocast_kernel_dtype="float32", mode="inference")
    hf = transformers.xLSTMForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.3)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp, **kwargs)
    _write_tokenizer(tmp / "tokenizer.json", 120)
    return tmp, hf


def _write_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["[UNK]"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _save_hf(tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    return _save_hf(tmp_path_factory.mktemp("sharded"), shard="40KB")


@pytest.mark.parametrize("which", ["hf_dir", "hf_sharded"])
def test_save_pretrained_checkpoint_reproduces_logits(request, which, seed):
    path, hf = request.getfixturevalue(which)
    if which == "hf_sharded":
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 2
    model = load_model(path, device="cpu", runtime=OPTS)
    ids = torch.randint(0, 120, (2, 27))
    with torch.no_grad():
        ref = hf(ids, use_cache=True).logits
    assert rel_err(model(ids)[0], ref) < 1e-4, f"seed={seed}"
    # the tokenizer.json was read through `tokenizers`
    assert model.encode("w3 w7 w1").tolist() == [[3, 7, 1]]
    assert model.decode([3, 7]) == "w3 w7"


def test_loads_straight_to_bfloat16(hf_dir):
    path, hf = hf_dir
    model = load_model(path, device="cpu", dtype="bfloat16", runtime=OPTS)
    assert all(p.dtype == torch.bfloat16 for p in model.net.parameters())
    assert torch.equal(model.net.lm_head.weight, hf.lm_head.weight.to(torch.bfloat16))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _expect(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu", runtime=OPTS)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_config_field(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path / "c")
    _edit_config(path, num_heads=None)
    _expect(path, "missing required config field", "num_heads")


def test_unknown_config_field(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path / "c")
    _edit_config(path, num_headz=4)
    _expect(path, "unknown config field", "num_headz")


def test_legacy_config_names_are_accepted(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path / "c")
    _edit_config(path, hidden_size=None, num_hidden_layers=None)  # only embedding_dim / num_blocks remain
    model = load_model(path, device="cpu", runtime=OPTS)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2


def test_wrong_tensor_shape(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path / "c")
    _edit_config(path, vocab_size=121)
    _expect(path, "backbone.embeddings.weight", "shape")


def test_missing_and_unexpected_weights_are_listed(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(hf_dir[0], tmp_path / "c")
    weights = load_file(path / "model.safetensors")
    weights.pop("backbone.blocks.1.ffn.proj_down.weight")
    weights["backbone.blocks.9.extra.weight"] = torch.zeros(2)
    save_file(weights, path / "model.safetensors")
    _expect(path, "missing weight(s)", "backbone.blocks.1.ffn.proj_down.weight", "unexpected weight(s)", "backbone.blocks.9.extra.weight")


def test_missing_shard(hf_sharded, tmp_path):
    path = _copy(hf_sharded[0], tmp_path / "c")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    _expect(path, "missing shard", victim.name)


def test_truncated_safetensors(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path / "c")
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    _expect(path, "model.safetensors", "corrupt or truncated")


def test_corrupt_safetensors_header(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _expect(path, "corrupt or truncated")


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _expect(tmp_path, "not a checkpoint directory")
    with pytest.raises(UserError, match="neither a preset"):
        load_model(tmp_path / "absent", device="cpu")


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    proc = subprocess.run([sys.executable, "-m", "xlstm_tune", "run", "--model", str(tmp_path), "--device", "cpu",
                           "--prompt", "hi", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not valid JSON" in lines[0] and "Traceback" not in proc.stderr
