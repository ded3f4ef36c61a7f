"""Norms of SmolLM2's output-embedding rows, MLP value vectors and last-token hidden states (notes/knowedit.md, KN).

    OMP_NUM_THREADS=1 python notes/scripts/kn_norms.py
"""

import torch

from editors.lm.architectures import layer_module, num_layers
from editors.lm.loading import load_model

torch.set_num_threads(1)
model, tok = load_model("smollm2-135m")
head = model.get_output_embeddings().weight.detach().float()
e = head.norm(dim=1)
print(f"output-embedding row norm: median {e.median():.3f}  p5 {e.quantile(.05):.3f}  p95 {e.quantile(.95):.3f}")
print("tied:", model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
for layer in (0, 5, 10, 15, 20, 25, num_layers(model) - 1):
    w = layer_module(model, layer, "mlp_out").weight.detach().float()  # (d, inter): value vectors are columns
    v = w.norm(dim=0)
    print(f"layer {layer:2d}: value-vector norm median {v.median():.3f} p95 {v.quantile(.95):.3f}  "
          f"ratio E/v {e.median() / v.median():.1f}x")
ids = tok("The capital of France is", return_tensors="pt")
with torch.no_grad():
    out = model(**ids, output_hidden_states=True)
print("hidden-state norm at last token, layers 0,5,...,30:",
      [round(float(h[0, -1].norm()), 1) for h in out.hidden_states[::5]])
