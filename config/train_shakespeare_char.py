# Character-level Shakespeare on a laptop-class CPU: what `make demo` trains, in about 3 minutes on 2 cores.
# Measured on 2 AMD EPYC cores (fp32, no AMX): about 150-180 ms/iter, 2 min 40 s to 3 min 10 s for the whole
# process, val loss 1.55 on the whole validation split (four plays never seen in training).
# The speedrun's recipe (Muon, rotary positions, QK-norm, squared ReLU, warmup-stable-decay) on a larger
# batch: with Muon a step costs a fixed Newton-Schulz iteration besides the batch, so 32 rows a step
# reach a given loss sooner than 12. Dropout does not pay off at two epochs. Figures in the README.
out_dir = "checkpoint/shakespeare_char"
dataset = "shakespeare_char"
eval_interval = 450
eval_iters = 20
log_interval = 50

batch_size = 32
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos = "rope"
qk_norm = True
mlp = "relu2"

optimizer = "muon"
muon_lr = 0.02
learning_rate = 2e-3  # AdamW's, for the embedding and the gains
max_iters = 900
lr_schedule = "wsd"
decay_frac = 0.3
warmup_iters = 40
lr_decay_iters = 900
min_lr = 0.0
