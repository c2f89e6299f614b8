"""LoRA adapters (``--lora``, ``--lora_2``, ``--fuse_lora``; ``dvg_dist/runtime/lora.py``) on the tiny Wan checkpoints,
with tiny random LoRAs written here (``build_tiny_lora``) in both the diffusers and the original-Wan key format: the
engine equals diffusers' own pipeline with the same LoRAs loaded, fused or not, on one expert or both, on one process
and on two (sequence parallel, FSDP2 weight sharding, offload); bad LoRAs are one line before any weight loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from distributed import run_distributed
from safetensors.torch import load_file, save_file

from dvg_dist.config import ConfigError, LoraSpec, load_config
from dvg_dist.dvg import hash_noise
from dvg_dist.executors.local import main as generate_main
from dvg_dist.models import InputError
from dvg_dist.models.tiny import build_tiny_lora
from dvg_dist.runtime.engine import Engine, Request, validate

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"


def _config(yaml: str, path: Path | str, *overrides: str):
    return load_config(ROOT / "configs" / yaml, [f"model.path={path}", *overrides])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pipeline_latent(pipe: Any, seed: int, steps: int, **kwargs: Any) -> torch.Tensor:
    latents = hash_noise(seed, 16, torch.arange(5), torch.arange(8), torch.arange(8))
    return pipe(
        prompt=PROMPT, negative_prompt="", latents=latents, num_inference_steps=steps, height=64, width=64,
        num_frames=17, output_type="latent", **kwargs,
    ).frames  # fmt: skip


@pytest.fixture(scope="module")
def loras(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Random LoRAs for the tiny Wan 2.1 transformer and both experts of the tiny Wan 2.2 A14B."""
    root = tmp_path_factory.mktemp("loras")
    wan, moe = tiny_checkpoint("wan"), tiny_checkpoint("wan-moe")
    return {
        "a": build_tiny_lora(wan, root / "a.safetensors", seed=1),
        "a_wan_format": build_tiny_lora(wan, root / "a-wan.safetensors", seed=1, fmt="wan"),
        "b_wan_format": build_tiny_lora(wan, root / "b-wan.safetensors", seed=2, fmt="wan"),
        "high": build_tiny_lora(moe, root / "high.safetensors", seed=3),
        "low_wan_format": build_tiny_lora(moe, root / "low.safetensors", seed=4, component="transformer_2", fmt="wan"),
    }


def test_lora_spec_parsing():
    assert LoraSpec.parse("x.safetensors", "f") == LoraSpec("x.safetensors", 1.0)
    assert LoraSpec.parse("dir/x.safetensors:0.75", "f") == LoraSpec("dir/x.safetensors", 0.75)
    assert LoraSpec.parse("C:/loras/x.safetensors", "f") == LoraSpec("C:/loras/x.safetensors", 1.0)
    assert LoraSpec.parse({"path": "x.safetensors", "scale": 2}, "f").scale == 2.0
    config = load_config(None, ['model.loras=["a.safetensors:0.5", {path: b.safetensors}]', "model.fuse_lora=true"])
    assert config.model.loras == (LoraSpec("a.safetensors", 0.5), LoraSpec("b.safetensors", 1.0))
    bad_specs = [("x.safetensors:big", "is not PATH[:SCALE]"), (":0.5", "is not PATH[:SCALE]"),
                 ("x.safetensors:nan", "finite"), ({"path": "x", "weight": 1}, "unknown key weight")]  # fmt: skip
    for bad, needle in bad_specs:
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
            LoraSpec.parse(bad, "model.loras")
    with pytest.raises(ConfigError, match="no LoRA is given"):
        load_config(None, ["model.fuse_lora=true"])


def test_lora_equals_wan_pipeline_with_the_same_loras_fused_or_not(tiny_checkpoint, loras):
    path = tiny_checkpoint("wan")
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    base = _pipeline_latent(pipe, 3, 6, guidance_scale=5.0)
    # diffusers' own way: both files as named adapters, with their scales.
    pipe.load_lora_weights(str(loras["a"]), adapter_name="a")
    pipe.load_lora_weights(str(loras["b_wan_format"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    ref = _pipeline_latent(pipe, 3, 6, guidance_scale=5.0)
    assert _rel(ref, base) > 0.05, "the tiny LoRAs must change the result clearly, or this test proves nothing"

    two = f'model.loras=["{loras["a"]}:0.8", "{loras["b_wan_format"]}:0.5"]'
    full = ("sampling.mode=full", "sampling.steps=6")
    validate(_config("tiny-wan.yaml", path, two, *full), [Request(PROMPT)])
    engine = Engine(_config("tiny-wan.yaml", path, two, *full))
    ours = engine.generate([Request(PROMPT, seed=3)], decode=False, progress=False)
    assert torch.equal(ours.latent, ref), f"engine + LoRAs differs from WanPipeline + LoRAs by {_rel(ours.latent, ref)}"
    assert [(x["component"], x["scale"]) for x in engine.loras] == [("transformer", 0.8), ("transformer", 0.5)]

    fused = Engine(_config("tiny-wan.yaml", path, two, *full, "model.fuse_lora=true"))
    names = [n for n, _ in fused.adapter.pipe.transformer.named_parameters()]
    assert not any("lora" in n for n in names), "fused: the LoRA layers are gone"
    latent = fused.generate([Request(PROMPT, seed=3)], decode=False, progress=False).latent
    print(f"fused LoRAs vs WanPipeline + LoRAs: relative difference {_rel(latent, ref):.2e}")
    assert _rel(latent, ref) < 1e-5, f"fused differs by {_rel(latent, ref):.2e} (only the rounding of W + BA may)"

    # The original-Wan format (lora_down/lora_up, alpha) of the same LoRA is the same adapter once converted.
    same = Engine(_config("tiny-wan.yaml", path, f'model.loras=["{loras["a_wan_format"]}"]', *full))
    one = Engine(_config("tiny-wan.yaml", path, f'model.loras=["{loras["a"]}"]', *full))
    x, y = (e.generate([Request(PROMPT, seed=3)], decode=False, progress=False).latent for e in (same, one))
    assert _rel(x, y) < 1e-6, f"wan-format LoRA differs from its diffusers-format twin by {_rel(x, y):.2e}"

    # DVG runs on the adapted model: the same plan and latent as DVG on a pipeline the LoRAs were loaded into.
    dvg = Engine(_config("tiny-wan.yaml", path, two, "sampling.steps=8"))
    mine = dvg.generate([Request(PROMPT, seed=2)], decode=False, progress=False)
    theirs = Engine(_config("tiny-wan.yaml", path, "sampling.steps=8"), pipe).generate(
        [Request(PROMPT, seed=2)], decode=False, progress=False
    )
    assert mine.record.to_dict()["chosen"] == theirs.record.to_dict()["chosen"]
    assert torch.equal(mine.latent, theirs.latent)


def test_lora_2_adapts_the_low_noise_expert_only(tiny_checkpoint, loras):
    path = tiny_checkpoint("wan-moe")
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.load_lora_weights(str(loras["high"]), adapter_name="high")
    pipe.load_lora_weights(str(loras["low_wan_format"]), adapter_name="low", load_into_transformer_2=True)
    pipe.transformer.set_adapters(["high"], [1.0])
    pipe.transformer_2.set_adapters(["low"], [0.6])
    ref = _pipeline_latent(pipe, 5, 10, guidance_scale=4.0, guidance_scale_2=3.0)

    cfg = _config("tiny-wan-moe.yaml", path, "sampling.mode=full", "sampling.steps=10",
                  f'model.loras=["{loras["high"]}"]', f'model.loras_2=["{loras["low_wan_format"]}:0.6"]')  # fmt: skip
    engine = Engine(cfg)
    ours = engine.generate([Request(PROMPT, seed=5)], decode=False, progress=False)
    assert torch.equal(ours.latent, ref), f"MoE + LoRAs differs from WanPipeline + LoRAs by {_rel(ours.latent, ref)}"
    assert {t.expert for t in ours.trace} == {"transformer", "transformer_2"}
    experts = engine.adapter.pipe
    assert set(experts.transformer.peft_config) == {"transformer_lora0"}
    assert set(experts.transformer_2.peft_config) == {"transformer_2_lora0"}


def _parallel_job(rank: int, world: int, path: str, high: str, low: str) -> dict[str, torch.Tensor]:
    """Sequence parallel over 2 ranks with both experts adapted: unfused, unfused + FSDP2, fused + FSDP2 + offload."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.runtime.distributed import ParallelContext

    par = ParallelContext(build_groups(ParallelLayout(world, world, 1, num_heads=2)))
    adapters = (f'model.loras=["{high}"]', f'model.loras_2=["{low}:0.6"]')
    out = {}
    for name, extra in [("sp", ()), ("sp_sharded", ("parallel.shard_weights=true",)),
                        ("sp_sharded_fused_offload", ("parallel.shard_weights=true", "model.fuse_lora=true",
                                                      "model.offload=true")),
                        # bfloat16 (diffusers keeps some layers float32): FSDP2 must take the mixed dtypes.
                        ("bf16_sp_sharded", ("parallel.shard_weights=true", "model.dtype=bfloat16"))]:  # fmt: skip
        engine = Engine(_config("tiny-wan-moe.yaml", path, "sampling.steps=10", *adapters, *extra), parallel=par)
        out[name] = engine.generate([Request(PROMPT, seed=4)], decode=False, progress=False).latent
    return out


@pytest.mark.slow
def test_lora_on_two_ranks_with_sequence_parallel_sharding_and_offload(tiny_checkpoint, loras):
    path = tiny_checkpoint("wan-moe")
    adapters = (f'model.loras=["{loras["high"]}"]', f'model.loras_2=["{loras["low_wan_format"]}:0.6"]')
    single = Engine(_config("tiny-wan-moe.yaml", path, "sampling.steps=10", *adapters))
    ref = single.generate([Request(PROMPT, seed=4)], decode=False, progress=False).latent
    plain = Engine(_config("tiny-wan-moe.yaml", path, "sampling.steps=10"))
    assert _rel(plain.generate([Request(PROMPT, seed=4)], decode=False, progress=False).latent, ref) > 0.05

    results = run_distributed(_parallel_job, 2, str(path), str(loras["high"]), str(loras["low_wan_format"]),
                              timeout=400)  # fmt: skip
    bf16 = Engine(_config("tiny-wan-moe.yaml", path, "sampling.steps=10", "model.dtype=bfloat16", *adapters))
    ref_bf16 = bf16.generate([Request(PROMPT, seed=4)], decode=False, progress=False).latent
    for rank, r in enumerate(results):
        rel = _rel(r.pop("bf16_sp_sharded"), ref_bf16)
        print(f"rank {rank} bfloat16 sp_sharded: vs one process relative difference {rel:.2e}")
        assert rel < 3e-2, f"rank {rank}: bfloat16 sharded differs from one process by {rel:.2e} (bf16 rounding only)"
        for name, latent in r.items():
            rel = _rel(latent, ref)
            print(f"rank {rank} {name}: vs one process relative difference {rel:.2e}")
            assert rel < 1e-5, f"rank {rank} {name}: differs from the single-process DVG run by {rel:.2e}"


def _garbage_lora(tmp: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    save_file(tensors, str(tmp / name))
    return str(tmp / name)


def test_bad_loras_are_one_line_before_any_weight_loads(tiny_checkpoint, loras, tmp_path, capsys):
    wan, moe, hv = tiny_checkpoint("wan"), tiny_checkpoint("wan-moe"), tiny_checkpoint("hunyuan")
    (tmp_path / "not.safetensors").write_bytes(b"this is no safetensors file")
    a = load_file(str(loras["a"]))
    renamed = _garbage_lora(tmp_path, "renamed.safetensors",
                            {k.replace("attn1", "attn9"): v for k, v in a.items()})  # fmt: skip
    wider = _garbage_lora(tmp_path, "wider.safetensors", {
        k: torch.zeros(v.shape[0], 2 * v.shape[1]) if k.endswith("lora_A.weight") else v for k, v in a.items()
    })  # fmt: skip
    half = _garbage_lora(tmp_path, "half.safetensors", {k: v for k, v in a.items() if "lora_B" not in k})
    cases = [
        (wan, ["--lora", str(tmp_path / "missing.safetensors")], "--lora: LoRA file not found"),
        (wan, ["--lora", str(tmp_path / "not.safetensors")], "is not a safetensors file"),
        (wan, ["--lora", renamed], "match no module of the transformer, e.g. blocks.0.attn9.to_"),
        (wan, ["--lora", wider], "is 24->24 in the transformer, the LoRA is (4, 48)"),
        (wan, ["--lora", half], "has only one of lora_A / lora_B"),
        (wan, ["--lora", f"{loras['a']}:strong"], "is not PATH[:SCALE]"),
        (wan, ["--lora_2", str(loras["a"])], "--lora_2 adapts transformer_2"),
        (wan, ["--fuse_lora"], "no LoRA is given"),
        (hv, ["--lora", str(loras["a"])], "LoRAs are supported on Wan checkpoints"),
        # A LoRA for the other expert's config still fits here (same sizes); one for a wider model does not.
        (moe, ["--lora_2", wider], "--lora_2: "),
    ]
    for model, extra, needle in cases:
        out = tmp_path / "out"
        argv = ["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(model), "--prompt", PROMPT,
                "--out", str(out), *extra]  # fmt: skip
        assert generate_main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if "error:" in line]
        assert len(errors) == 1 and needle in errors[0], (extra, err)
        assert "Traceback" not in "\n".join(err) and not out.exists()
    # The engine refuses the same before loading: a missing LoRA on a checkpoint that does not even exist.
    with pytest.raises(InputError, match="LoRA file not found"):
        validate(_config("tiny-wan.yaml", wan, f'model.loras=["{tmp_path}/none.safetensors"]'), [Request(PROMPT)])


def test_sidecar_records_the_loras(tiny_checkpoint, loras, tmp_path):
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(tiny_checkpoint("wan")),
            "--prompt", PROMPT, "--out", str(out), "--steps", "4", "--mode", "full", "--lora",
            f"{loras['a']}:0.8", "--lora", str(loras["b_wan_format"]), "--fuse-lora"]  # fmt: skip
    assert generate_main(argv) == 0
    (side,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert side["loras"] == [
        {"component": "transformer", "path": str(loras["a"]), "scale": 0.8},
        {"component": "transformer", "path": str(loras["b_wan_format"]), "scale": 1.0},
    ]
    assert side["fuse_lora"] is True
