"""The `yunque` command: one table of subcommands, each a typed function elsewhere.

Modules are imported only for the command that runs, so `yunque data ...` does not
pay for importing torch and `yunque --help` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, function, one-line help). The function's signature is the CLI.
# PASSTHROUGH commands hand their arguments, unparsed, to another tool's own parser.
PASSTHROUGH = {"lm-eval"}
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("yunque.recipes.generate", "generate_cmd", "complete a prompt with a model"),
    "chat": ("yunque.recipes.generate", "chat_cmd", "interactive chat with streaming output"),
    "inspect": ("yunque.recipes.inspect", "inspect_cmd", "show a checkpoint's architecture, size, files and hashes"),
    "init": ("yunque.recipes.inspect", "init_cmd", "write a randomly initialised model from a preset"),
    "import": (
        "yunque.recipes.models",
        "import_cmd",
        "convert a GGUF file (llama.cpp) into a Hugging Face model directory",
    ),
    "models": (
        "yunque.recipes.models",
        "models_cmd",
        "list the pretrained models (--model NAME works wherever a directory does)",
    ),
    "tokenizer train": ("yunque.recipes.tokenizer", "train_cmd", "train a byte-level BPE tokenizer"),
    "data prepare": ("yunque.recipes.data", "prepare_cmd", "read, clean, dedup, scrub, split and hash training data"),
    "data verify": ("yunque.recipes.data", "verify_cmd", "check a prepared data folder against its manifest"),
    "data inspect": ("yunque.recipes.data", "inspect_cmd", "show rendered examples, masks and length statistics"),
    "train": ("yunque.recipes.train", "train_cmd", "pretrain or fine-tune (full, LoRA, QLoRA) from a YAML config"),
    "merge": ("yunque.recipes.merge", "merge_cmd", "merge a LoRA/QLoRA adapter into its base model"),
    "quantize": ("yunque.recipes.quantize", "quantize_cmd", "int8 / int4 weight-only quantisation for inference"),
    "export": (
        "yunque.recipes.export",
        "export_cmd",
        "export a model for another runtime (GGUF for llama.cpp / Ollama, ONNX with a KV cache)",
    ),
    "eval": (
        "yunque.recipes.evaluate",
        "eval_cmd",
        "perplexity, ROUGE, BLEU, exact match, accuracy/F1; compare models",
    ),
    "redteam": (
        "yunque.recipes.evaluate",
        "redteam_cmd",
        "run the red-team probe suite against a model or an endpoint",
    ),
    "privacy-audit": (
        "yunque.recipes.privacy",
        "privacy_audit_cmd",
        "canary exposure and membership inference against a fine-tuned model",
    ),
    "data canaries": (
        "yunque.recipes.evaluate",
        "canaries_cmd",
        "plant canary strings in training data to measure leakage",
    ),
    "serve": ("yunque.recipes.serve", "serve_cmd", "OpenAI-compatible HTTP server, safe by default"),
    "keys create": ("yunque.recipes.serve", "keys_create_cmd", "create an API key for `yunque serve` (shown once)"),
    "keys list": ("yunque.recipes.serve", "keys_list_cmd", "list API keys (names and limits, never the keys)"),
    "keys revoke": ("yunque.recipes.serve", "keys_revoke_cmd", "revoke an API key"),
    "lm-eval": ("yunque.recipes.lmeval", "lm_eval_cmd", "lm-evaluation-harness with the `yunque` model registered"),
    "demo": (
        "yunque.recipes.demo",
        "demo_cmd",
        "fine-tune a pretrained model into a security assistant on CPU, end to end, and report",
    ),
}


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    rows = "\n".join(f"  {k.ljust(width)}  {h}" for k, (_, _, h) in COMMANDS.items())
    return f"usage: yunque COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n`yunque COMMAND --help` for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from yunque import __version__

        print(f"yunque {__version__}")
        return 0
    name = next((k for k in sorted(COMMANDS, key=len, reverse=True) if argv[: len(k.split())] == k.split()), None)
    if name is None:
        print(f"yunque: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from yunque.cli import call_with_argv
    from yunque.errors import YunqueError

    try:
        fn = getattr(importlib.import_module(module), func)
        rest = argv[len(name.split()) :]
        result = fn(rest) if name in PASSTHROUGH else call_with_argv(fn, rest, prog=f"yunque {name}")
    except YunqueError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # argparse's --help, or a usage error it has already printed
        return e.code if isinstance(e.code, int) else 2
    # Last resort for input no reader anticipated (readers raise YunqueError naming the file): still
    # one line and exit 2, not a traceback.
    except RecursionError:
        print(f"error: yunque {name}: an input is nested too deeply to read", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"error: yunque {name}: an input is not valid UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
