"""Greedy chat answers of a chat model (a checkpoint folder or a GGUF file) at
P = 1, and P = 2 and 4 at CR 8, with the family's defaults (for the Llama
family: the kv point, position 0 exact), as markdown: bench/FINETUNE.md's
SmolLM2 answers before and after fine-tuning.

    python bench/chat_answers.py MODEL [MODEL ...] > answers.md
"""

from __future__ import annotations

import argparse
import warnings

import torch
from pydoc_data.topics import topics

import prism_ext

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the sum of a list of numbers.",
    f"Here is part of the Python documentation:\n\n{topics['for'][:900]}\n\n"
    "In one sentence, what does the for statement do?",
]
SETTINGS = ((1, 1), (2, 8), (4, 8))  # (devices, CR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="checkpoint folders or GGUF files with a chat template")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # a short prompt at P = 4, CR = 8 warns (one segment a device): shown as is
    for path in args.models:
        m = prism_ext.load(path)
        print(f"## {path}\n")
        for prompt in PROMPTS:
            ids = torch.tensor([m.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                                add_generation_prompt=True)])
            print(f"**Prompt** ({ids.shape[1]} tokens): {prompt[:80]!r}{'...' if len(prompt) > 80 else ''}\n")
            for devices, cr in SETTINGS:
                out = m.generate(ids, devices=devices, cr=cr, max_new_tokens=args.max_new_tokens)
                text = m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                print(f"- P = {devices}, CR = {cr}: {text.strip().replace(chr(10), ' ')}")
            print()


if __name__ == "__main__":
    main()
