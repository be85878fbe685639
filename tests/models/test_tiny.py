from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from llm_platform.errors import ModelNotFoundError
from llm_platform.models.loading import load_causal_lm, resolve_model
from llm_platform.models.tiny import TINY_NAMES, build_tiny_models, checkpoint_digest, parameter_count


def test_build_is_deterministic_byte_for_byte(tiny_models, tmp_path: Path):
    again = build_tiny_models(tmp_path, force=True)
    for name in TINY_NAMES:
        files = sorted(p.name for p in tiny_models[name].iterdir())
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert files == sorted(p.name for p in again[name].iterdir())
        assert checkpoint_digest(tiny_models[name]) == checkpoint_digest(again[name])


def test_sizes_grow_clearly_and_head_dim_is_64(tiny_models):
    counts = [parameter_count(tiny_models[name]) for name in TINY_NAMES]
    assert counts[0] < 1e6 < counts[1] < 1e7 < counts[2] < 5e7
    assert counts[1] > 5 * counts[0] and counts[2] > 4 * counts[1]
    for name in TINY_NAMES:
        config = AutoModelForCausalLM.from_pretrained(tiny_models[name]).config
        assert config.hidden_size // config.num_attention_heads == 64
        assert config.model_type == "llama" and config.dtype == torch.float32


def test_tokenizer_round_trips_and_has_a_chat_template(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-s"])
    text = "Review: The phone is great. Ünïcödé and emoji 🚀 survive byte-level BPE."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Trained on the project's corpus, so task words are single tokens rather than bytes.
    assert len(tok(" positive negative", add_special_tokens=False).input_ids) == 2
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_every_size_loads_and_generates_in_transformers(tiny_models):
    for name in TINY_NAMES:
        model = load_causal_lm(str(tiny_models[name]))
        tok = AutoTokenizer.from_pretrained(tiny_models[name])
        inputs = tok("Hello", return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs.input_ids.shape[1]:]
        assert len(new) == 5 or new[-1] == tok.eos_token_id


def test_loads_in_4bit_with_bitsandbytes(tiny_models):
    from bitsandbytes.nn import Linear4bit

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = load_causal_lm(str(tiny_models["tiny-m"]), quantization=quant)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    full = load_causal_lm(str(tiny_models["tiny-m"]))
    ids = torch.tensor([[1, 300, 301, 302]])
    with torch.no_grad():
        q_logits, f_logits = model(ids).logits, full(ids).logits
    # 4-bit weights approximate the float32 ones: close, but not equal.
    assert 0 < (q_logits - f_logits).abs().mean() < f_logits.abs().mean()
    assert torch.nn.functional.cosine_similarity(q_logits.flatten(), f_logits.flatten(), dim=0) > 0.8


def test_model_names_resolve_or_fail_clearly(tiny_models, tmp_path: Path):
    assert resolve_model(str(tiny_models["tiny-s"])) == str(tiny_models["tiny-s"])
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "tiny-xl"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("not a model id!")


def test_a_tokenizer_from_the_hub_is_fetched_without_the_weights(tiny_models, monkeypatch):
    """The hub cannot be reached here, so its download function is replaced by one that records what was
    asked and serves a tiny model: a tokenizer (what every driver-side check loads) must not ask for the
    weights, a model must."""
    import huggingface_hub

    from llm_platform.models.loading import load_tokenizer

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(tiny_models["tiny-s"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    load_tokenizer("meta-llama/Llama-2-7b-chat-hf")
    load_causal_lm("meta-llama/Llama-2-7b-chat-hf")
    (_, tokenizer_files), (_, model_files) = asked
    assert "*.safetensors" not in tokenizer_files and "*.json" in tokenizer_files
    assert "*.safetensors" in model_files


@pytest.mark.parametrize("family, bos, eos, stops", [
    ("llama-2", "<s>", "</s>", ["</s>"]),
    ("llama-3", "<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"]),
    ("chatml", None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
])
def test_build_tiny_with_a_real_family_template(tmp_path: Path, capsys, family, bos, eos, stops):
    import json

    from llm_platform.cli import main

    main(["models", "build-tiny", "--out", str(tmp_path), "--chat-template", family, "--sizes", "tiny-s"])
    assert "tiny-s" in capsys.readouterr().out and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-s"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny-s")
    assert (tok.bos_token, tok.eos_token) == (bos, eos)
    assert tok.pad_token not in (None, eos)  # padding is never mistaken for the end of a reply
    ids = tok("Hi", add_special_tokens=True).input_ids
    assert (ids[0] == tok.bos_token_id) if bos else tok.decode(ids) == "Hi"  # ChatML (Qwen) adds no BOS
    for marker in (*stops, *tok.all_special_tokens):  # special tokens are single tokens
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1
    generation = json.loads((tmp_path / "tiny-s" / "generation_config.json").read_text())
    end = generation["eos_token_id"]
    assert (end if isinstance(end, list) else [end]) == tok.convert_tokens_to_ids(stops)
    again = build_tiny_models(tmp_path / "again", chat_template=family, sizes=("tiny-s",))
    assert checkpoint_digest(again["tiny-s"]) == checkpoint_digest(tmp_path / "tiny-s")
    with pytest.raises(ValueError, match="chat template family 'vicuna'"):
        build_tiny_models(tmp_path / "x", chat_template="vicuna")
