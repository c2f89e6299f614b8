"""Command-line flags shared by the entry points (generate.py, ray_generate.py): one definition.

Flag names follow the official Wan/Hunyuan scripts and xDiT; dashes and underscores are both accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..config import ATTENTION_BACKENDS, Config, ConfigError, load_config
from ..dvg.options import Mode
from ..models import InputError
from .engine import Request


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one ``prog: error: …`` line and exit 2, never a usage block or traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    """Add a flag under each name and its dash/underscore twin."""
    spelled: list[str] = []
    for n in names:
        for v in (n, "--" + n[2:].replace("_", "-"), "--" + n[2:].replace("-", "_")):
            if v not in spelled:
                spelled.append(v)
    parser.add_argument(*spelled, **kwargs)


class _VersionAction(argparse.Action):
    """``--version``: packages, devices, backends and the compatibility verdict, then exit (no other flag needed)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from .versions import version_report

        print(version_report())  # stdout, like argparse's own version action
        parser.exit(0)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Model, prompt and sampling flags; anything else is ``--set section.key=value``."""
    parser.add_argument("--version", action=_VersionAction, help="installed versions and backends, then exit")
    _flag(parser, "--config", required=True, help="YAML config (configs/*.yaml)")
    _flag(parser, "--model", help="diffusers pipeline directory (overrides model.path)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="prompts, one per line, or JSONL with prompt/seed/...")
    _flag(parser, "--negative_prompt", help="negative prompt (CFG's unconditional branch)")
    _flag(parser, "--image", help="first frame for image-to-video checkpoints")
    _flag(parser, "--seed", "--base_seed", type=int, help="seed (JSONL lines may give their own)")
    _flag(parser, "--steps", "--sample_steps", "--num_inference_steps", type=int, help="denoising steps N")
    _flag(parser, "--guidance_scale", "--sample_guide_scale", type=float, help="CFG scale; 1 disables CFG")
    _flag(parser, "--guidance_scale_2", type=float, help="low-noise expert's CFG scale (Wan 2.2 A14B)")
    _flag(parser, "--true_cfg_scale", type=float, help="real CFG where guidance_scale is embedded (HunyuanVideo)")
    _flag(parser, "--use_dynamic_cfg", action="store_true", default=None,
          help="CogVideoX's cosine guidance schedule (its recipe's default)")  # fmt: skip
    _flag(parser, "--decode_timestep", type=float, help="LTX-Video 0.9.1+: the VAE's decode timestep (default 0)")
    _flag(parser, "--decode_noise_scale", type=float, help="LTX-Video 0.9.1+: noise mixed in before decoding")
    _flag(parser, "--sample_shift", "--shift", type=float, help="the model's schedule shift (default: checkpoint's)")
    _flag(parser, "--size", help="W x H in pixels, e.g. 1280x720 or 1280*720")
    _flag(parser, "--frame_num", "--num_frames", type=int, help="pixel frames (4k+1 for Wan/Hunyuan)")
    _flag(parser, "--budget", type=float, help="DVG's target density ρ* in (0, 1]")
    _flag(parser, "--mode", choices=[m.value for m in Mode], help="full, dvg, or an ablation")
    _flag(parser, "--fixed", metavar="S,R", help="spatial and temporal ratio for --mode fixed")
    _flag(parser, "--dtype", choices=["float32", "bfloat16", "float16"])
    _flag(parser, "--device", help="cuda, cuda:N, cpu, or auto")
    _flag(parser, "--ulysses_degree", "--ulysses_size", type=int, help="ranks in Ulysses (must divide the heads)")
    _flag(parser, "--ring_degree", "--ring_size", type=int, help="ranks in ring attention")
    _flag(parser, "--use_cfg_parallel", "--cfg_parallel", action="store_true", default=None,
          help="cond and uncond passes on the two halves of the world")  # fmt: skip
    _flag(parser, "--backend", choices=["auto", "nccl", "gloo"], help="process-group backend (default auto)")
    _flag(parser, "--stage_layouts", metavar="L[,L,L,L]",
          help="per-stage layouts: auto, fixed or a spec (u4, cfg2xu2, dp2xu2); one, or one per stage")  # fmt: skip
    _flag(
        parser,
        "--attention_backend",
        choices=list(ATTENTION_BACKENDS),
        help="sequence-parallel attention: native (default), xfuser (yunchang USP) or deepspeed (Ulysses)",
    )
    _flag(
        parser,
        "--shard_weights",
        "--use_fsdp",
        action="store_true",
        default=None,
        help="shard the transformer weights over the sp group (FSDP2)",
    )
    _flag(
        parser,
        "--offload",
        "--offload_model",
        "--enable_model_cpu_offload",
        action="store_true",
        default=None,
        help="keep each component on the CPU until it runs (lower peak GPU memory)",
    )
    _flag(
        parser,
        "--text_encoder_offload",
        "--t5_cpu",
        action="store_true",
        default=None,
        help="move the text encoder to the CPU after encoding",
    )
    _flag(
        parser,
        "--text_encoder_rank0",
        action="store_true",
        default=None,
        help="only rank 0 loads and runs the text encoder; the embeddings are broadcast",
    )
    _flag(
        parser,
        "--vae_tiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tiled VAE decode (default on)",
    )
    _flag(
        parser,
        "--vae_parallel",
        "--use_parallel_vae",
        action="store_true",
        default=None,
        help="split the VAE decode over the ranks (DistVAE), gathered on rank 0",
    )
    _flag(
        parser,
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="LoRA safetensors for the transformer (Wan 2.2 A14B: the high-noise expert), repeatable",
    )
    _flag(
        parser,
        "--lora_2",
        action="append",
        metavar="PATH[:SCALE]",
        help="LoRA for transformer_2, the low-noise expert of Wan 2.2 A14B, repeatable",
    )
    _flag(
        parser, "--fuse_lora", action="store_true", default=None, help="fuse the LoRAs into the weights after loading"
    )
    _flag(
        parser,
        "--compile",
        "--use_torch_compile",
        nargs="?",
        const="blocks",
        choices=("none", "blocks", "full"),
        help="torch.compile the transformer: blocks (default; regional) or full; dynamic sequence length",
    )
    _flag(parser, "--timeout", type=float, help="process-group timeout in seconds (default 600)")
    _flag(parser, "--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, repeatable")


FLAG_FIELDS: dict[str, str] = {
    "model": "model.path",
    "steps": "sampling.steps",
    "guidance_scale": "sampling.guidance_scale",
    "guidance_scale_2": "sampling.guidance_scale_2",
    "true_cfg_scale": "sampling.true_cfg_scale",
    "use_dynamic_cfg": "sampling.use_dynamic_cfg",
    "decode_timestep": "sampling.decode_timestep",
    "decode_noise_scale": "sampling.decode_noise_scale",
    "sample_shift": "model.shift",
    "size": "sampling.size",
    "frame_num": "sampling.frame_num",
    "budget": "sampling.budget",
    "mode": "sampling.mode",
    "dtype": "model.dtype",
    "device": "model.device",
    "seed": "sampling.seed",
    "ulysses_degree": "parallel.ulysses_degree",
    "ring_degree": "parallel.ring_degree",
    "use_cfg_parallel": "parallel.cfg_parallel",
    "backend": "parallel.backend",
    "stage_layouts": "parallel.stage_layouts",
    "timeout": "parallel.timeout_s",
    "attention_backend": "parallel.attention_backend",
    "shard_weights": "parallel.shard_weights",
    "offload": "model.offload",
    "text_encoder_offload": "model.text_encoder_offload",
    "vae_tiling": "model.vae_tiling",
    "vae_parallel": "parallel.vae_parallel",
    "lora": "model.loras",
    "lora_2": "model.loras_2",
    "fuse_lora": "model.fuse_lora",
    "compile": "model.compile",
}
"""Flag (its argparse dest) → the config field it sets; the rest have their own handling below or go by ``--set``."""


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file, then the flags, then ``--set`` overrides (later wins)."""
    overrides: list[str] = []
    for attr, key in FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if getattr(args, "text_encoder_rank0", None):
        overrides.append("parallel.text_encoder=rank0")
    if getattr(args, "negative_prompt", None) is not None:
        overrides.append(f"sampling.negative_prompt={json.dumps(args.negative_prompt)}")
    if getattr(args, "fixed", None):
        parts = args.fixed.split(",")
        try:
            s, r = (float(p) for p in parts)
        except ValueError:
            raise ConfigError(f"--fixed must be S,R (two numbers), e.g. 0.7,0.5; got {args.fixed!r}") from None
        overrides.append(f"dvg.fixed=[{s}, {r}]")
        if getattr(args, "mode", None) is None:
            overrides.append("sampling.mode=fixed")
    return load_config(args.config, overrides + list(args.set))


def read_requests(args: argparse.Namespace, config: Config) -> list[Request]:
    """``--prompt`` or ``--prompts FILE`` (plain lines, or JSONL objects with prompt/seed/negative_prompt/
    image/name). A malformed line is an error naming its number, before any work."""
    seed = config.sampling.seed
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InputError("--prompt is empty")
        return [Request(args.prompt, seed, args.negative_prompt, args.image)]
    path = Path(args.prompts)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not text.startswith("{"):
            requests.append(Request(text, seed, args.negative_prompt, args.image))
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        unknown = set(item) - {"prompt", "seed", "negative_prompt", "image", "name"}
        if not isinstance(item.get("prompt"), str) or not item["prompt"].strip() or unknown:
            why = f"unknown keys {sorted(unknown)}" if unknown else "needs a non-empty string 'prompt'"
            raise InputError(f"{path}:{number}: {why}")
        if "seed" in item and (not isinstance(item["seed"], int) or isinstance(item["seed"], bool)):
            raise InputError(f"{path}:{number}: seed must be an integer")
        requests.append(
            Request(
                item["prompt"],
                item.get("seed", seed),
                item.get("negative_prompt", args.negative_prompt),
                item.get("image", args.image),
                item.get("name"),
            )
        )
    if not requests:
        raise InputError(f"{path} holds no prompts")
    return requests


def setup_logging(verbose: bool = False) -> None:
    """INFO lines for what was decided and why; the libraries' chatter at warning level or quieter."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("diffusers", "transformers", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass
