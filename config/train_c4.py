# A GPT on C4 for a budget of about 1e17 training FLOPs on one GPU.
#   python prepare.py --dataset=c4 --max_tokens=400_000_000 --val_tokens=5_000_000
#   python train.py config/train_c4.py --batch_size=32
#
# target_flops sets the length from the model's own FLOPs per token (model.flops_per_token()): 8 layers,
# 512 wide, context 512 come to about 331 MFLOP a token, so 1e17 FLOPs are about 300M tokens at any batch
# size, fewer than prepared, so no token is seen twice.
#   Target: validation perplexity <= 100 on C4's validation split (eval.json at the end); a model of
#   this size and budget should land around 50-70 by scaling-law estimates (not yet measured here).
out_dir = "checkpoint/c4"
dataset = "c4"
eval_interval = 1000
eval_iters = 100
log_interval = 50

batch_size = 32
block_size = 512
gradient_accumulation_steps = 1

n_layer = 8
n_head = 8
n_embd = 512
dropout = 0.0
bias = False

learning_rate = 1e-3
target_flops = 1e17
min_lr = 1e-4
warmup_iters = 500
weight_decay = 0.1

compile = True
