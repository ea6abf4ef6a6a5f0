# Shakespeare with the GPT-2 tokenizer (python prepare.py). The 50k-entry vocabulary makes the
# embedding most of this model, so it wants a GPU or some patience on a CPU.
out_dir = "checkpoint/shakespeare"
dataset = "shakespeare"
eval_interval = 250
eval_iters = 20
log_interval = 10

batch_size = 8
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.1

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
warmup_iters = 100
