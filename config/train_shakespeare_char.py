# Character-level Shakespeare on a laptop-class CPU: what `make demo` trains, in a few minutes on 2 cores
# (RESULTS.md has its times and losses, by machine).
# Muon, rotary positions and QK-norm as in the speedrun, but a gated MLP (swiglu) and a context of 128
# characters, which won at this length (the ablations in RESULTS.md), and a larger batch: a Muon step
# costs a fixed Newton-Schulz iteration besides the batch, so 16 rows of 128 a step reach a given loss
# sooner than 12 of 64. Dropout does not pay off at under two epochs. Muon's momentum is 0.85, not 0.95:
# a short run gains from averaging its gradients over fewer steps. The learning rate falls in a straight
# line from the end of warmup to zero (wsd without a stable phase), which reaches the loss of a cosine
# schedule in fewer steps (as Bergsma et al. 2025 found for language models).
out_dir = "checkpoint/shakespeare_char"
dataset = "shakespeare_char"
eval_interval = 420
eval_iters = 10  # quick estimates: the final evaluation covers the whole val split
log_interval = 50

batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos = "rope"
qk_norm = True
mlp = "swiglu"

optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.85
learning_rate = 2e-3  # AdamW's, for the embedding and the gains
max_iters = 840
lr_schedule = "wsd"
decay_frac = 1.0
warmup_iters = 40
lr_decay_iters = 840
min_lr = 0.0
