# GPT-2 small (124M) on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# add --parallel=fsdp to shard weights, gradients and optimizer state across the GPUs (a larger n_layer/n_embd)
# 12 sequences x 1024 tokens x 40 accumulation steps = about 0.5M tokens per optimizer step.
out_dir = "checkpoint/gpt2"
dataset = "openwebtext"
eval_interval = 1000
eval_iters = 200
log_interval = 10

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1

compile = True
