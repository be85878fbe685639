"""Fine-tuning on Ray Train, end to end on the tiny models: the methods learn, FSDP shards and agrees
with one worker, adapters load in PEFT and vLLM, bad inputs fail before any worker starts."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from llm_platform.config import load_config
from llm_platform.errors import ConfigError, DataError, PlatformError
from llm_platform.training.config import SFTConfig
from tests.training.conftest import CONFIGS, metric_rows, run_sft, two_at_a_time


# The module's single-worker jobs on tiny-m, longest first: the first two start together, each later one when a
# thread frees (LoRA, done first, leaves its thread to prompt tuning, the longer of the last two).
BACKGROUND = ("qlora", "lora", "prompt_tuning", "full")


def _job_of(item) -> str | None:
    """Which background job a collected test of this module awaits, if any."""
    if item.module.__name__ != __name__:
        return None
    if "lora_run" in item.fixturenames:
        return "lora"
    if item.originalname == "test_qlora_beats_the_untrained_model":
        return "qlora"
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("method") if callspec else None


@pytest.fixture(scope="module")
def jobs(request, ray_local, tiny_models, tmp_path_factory):
    """``{method: (out, future)}``: the jobs of the tests being run, two at a time in this process's threads
    (``two_at_a_time``), all started with the first test that asks. Each trains on one Ray Train worker of one
    CPU, single-threaded: one job alone left the second core mostly idle (0.68 of the two cores busy over QLoRA's
    run, measured), and two fill the session's two-CPU cluster. Each test awaits its own job; the FSDP test,
    which needs both CPUs, comes after them in the file. The LoRA job keeps its checkpoints (its test reads them);
    the others save only at the end."""
    wanted = {_job_of(item) for item in request.session.items}
    outs = {name: tmp_path_factory.mktemp(f"sft-{name}") for name in BACKGROUND if name in wanted}
    runs = {name: partial(run_sft, f"local_{name}.yaml", tiny_models["tiny-m"], out,
                          *([] if name == "lora" else ["optim.save_every=0"])) for name, out in outs.items()}
    with two_at_a_time(runs) as futures:
        yield {name: (outs[name], futures[name]) for name in outs}


@pytest.fixture(scope="module")
def lora_run(jobs):
    out, job = jobs["lora"]
    return out, job.result()


@pytest.mark.slow
def test_lora_config_learns_the_task(lora_run):
    out, summary = lora_run
    assert summary["eval_accuracy"] >= 0.9
    assert 0.35 <= summary["eval_accuracy_before"] <= 0.65  # chance on a balanced two-label task
    assert summary["train_loss"] <= summary["train_loss_first"] / 2
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}) and rows[-1]["step"] == summary["steps"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]
    assert list((out / "ray" / "sft-lora").glob("checkpoint_*/progress.json"))


@pytest.mark.slow
def test_lora_adapter_loads_in_peft_and_changes_logits(lora_run, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-m"])
    ids = tokenizer("Review: The lamp is superb.\nIs this review positive or negative?\nAnswer:",
                    return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-m"]).eval()
    with torch.no_grad():
        before = base(ids).logits[0, -1]
        tuned = PeftModel.from_pretrained(base, out / "adapter").eval()
        after = tuned(ids).logits[0, -1]
    assert not torch.allclose(before, after, atol=1e-3)
    assert tokenizer.decode(after.argmax()) == " positive"


@pytest.mark.slow
def test_lora_adapter_answers_through_vllm(lora_run, tiny_models, engines, loop):
    from llm_platform.data.loader import load_records
    from llm_platform.data.templates import sentiment_pair
    from llm_platform.engine import AdapterRef, SamplingParams

    out, _ = lora_run
    engine = engines("tiny-m", "vllm")
    adapter = AdapterRef(name="sft-sentiment", kind="lora", path=str(out / "adapter"))
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    records = list(load_records("synthetic:sentiment", "test", limit=12))
    tuned, base = [], []
    for i, record in enumerate(records):
        prompt = sentiment_pair(record, template=i % 4).prompt
        tuned.append(loop.run(engine.generate(prompt, greedy, adapter)).choices[0].text)
        base.append(loop.run(engine.generate(prompt, greedy)).choices[0].text)
    correct = sum(text == " " + r["label"] for text, r in zip(tuned, records))
    assert correct >= 10, list(zip(tuned, [r["label"] for r in records]))
    assert tuned != base


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "prompt_tuning"])
def test_other_methods_beat_the_untrained_model(method, jobs, tiny_models):
    out, job = jobs[method]
    check_learnt(method, job.result(), tiny_models["tiny-m"], out)


@pytest.mark.slow
def test_qlora_beats_the_untrained_model(jobs, tiny_models):
    out, job = jobs["qlora"]
    check_learnt("qlora", job.result(), tiny_models["tiny-m"], out)


def check_learnt(method: str, summary: dict, model, out) -> None:
    from transformers import AutoModelForCausalLM

    from llm_platform.training.methods import load_trained

    print(f"{method}: accuracy {summary['eval_accuracy_before']:.3f} -> {summary['eval_accuracy']:.3f}")
    assert summary["eval_accuracy"] > summary["eval_accuracy_before"] + 0.1
    assert summary["eval_loss"] < summary["eval_loss_before"]
    if method in ("qlora", "prompt_tuning"):  # every method learns the task on its local config (README table)
        assert summary["eval_accuracy"] >= 0.9
    if method == "full":
        assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    else:
        assert load_trained(str(model), str(out / "adapter"), method) is not None


@pytest.mark.slow
def test_fsdp_shards_add_up_and_two_accumulating_workers_match_one(ray_local, tiny_models, tmp_path):
    common = ["optim.max_steps=12", "optim.log_every=3", "optim.save_every=0", "data.eval_limit=32",
              "optim.learning_rate=1e-3"]
    one = run_sft("local_full.yaml", tiny_models["tiny-s"], tmp_path / "one", *common)
    # Two workers, each worker's share in two micro-batches (gradients reduce-scattered only after the
    # second), layers checkpointed: the same training as one worker's plain steps.
    two = run_sft("local_full.yaml", tiny_models["tiny-s"], tmp_path / "two", *common, "scaling.num_workers=2",
                  "optim.gradient_accumulation_steps=2", "gradient_checkpointing=true")
    assert two["sharding"] == "fsdp" and one["sharding"] == "none"
    assert sum(two["param_bytes_by_rank"]) == two["param_bytes_total"] == one["param_bytes_total"]
    assert max(two["param_bytes_by_rank"]) < 0.6 * two["param_bytes_total"]
    losses_one = [r["loss"] for r in metric_rows(tmp_path / "one")]
    losses_two = [r["loss"] for r in metric_rows(tmp_path / "two")]
    assert losses_one[-1] < losses_one[0] / 2
    assert losses_two == pytest.approx(losses_one, rel=2e-3)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=2e-3)

    # bf16 under FSDP is mixed precision (float32 master weights, bf16 compute, float32 reduction): it
    # learns as float32 does, within bf16's rounding, and saves bf16 weights.
    mixed = run_sft("local_full.yaml", tiny_models["tiny-s"], tmp_path / "bf16", *common, "scaling.num_workers=2",
                    "dtype=bfloat16")
    losses_mixed = [r["loss"] for r in metric_rows(tmp_path / "bf16")]
    assert losses_mixed == pytest.approx(losses_two, rel=5e-2) and losses_mixed[-1] < losses_mixed[0] / 2
    assert mixed["param_bytes_total"] == two["param_bytes_total"]  # held in float32, not halved
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_bad_inputs_fail_before_training(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="multiple of scaling.num_workers"):
        load_config(SFTConfig, CONFIGS / "local_lora.yaml", ["optim.batch_size=15", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match="method"):
        load_config(SFTConfig, CONFIGS / "local_lora.yaml", ["method=lorra"])
    with pytest.raises(ConfigError, match="register_base"):
        load_config(SFTConfig, CONFIGS / "local_lora.yaml", ["register_url=http://127.0.0.1:1"])
    with pytest.raises(DataError, match="does not exist"):
        run_sft("local_lora.yaml", tiny_models["tiny-s"], tmp_path, "data.source=/nowhere/train.jsonl")
    with pytest.raises(PlatformError, match="does not exist"):
        run_sft("local_lora.yaml", tmp_path / "no-model", tmp_path)


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(lora_run, tiny_models):
    out, _ = lora_run
    with pytest.raises(PlatformError, match=r"other settings \(changed: optim\)"):
        run_sft("local_lora.yaml", tiny_models["tiny-m"], out, "optim.learning_rate=1e-4")


SFT_CONFIGS = [p for p in sorted(CONFIGS.glob("*.yaml")) if not any(job in p.name for job in ("reward", "dpo", "rlhf"))]


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=lambda p: p.name)
def test_bundled_configs_validate(path):
    cfg = load_config(SFTConfig, path)
    if path.name.startswith("gpu_"):
        assert cfg.scaling.use_gpu and cfg.dtype == "bfloat16" and "://" in cfg.output_dir
    else:
        assert not cfg.scaling.use_gpu and cfg.model.startswith("artifacts/models/tiny-")
