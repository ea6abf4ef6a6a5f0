# The shortest way to nanoGPT's CPU-recipe loss (1.893 on the whole validation split) on 2 CPU cores.
# The same small model as nanoGPT's recipe (4 layers, 128 wide, context 64), trained with Muon, rotary
# positions, QK-norm and a squared-ReLU MLP, on a warmup-stable-decay schedule, with 16 rows a step rather
# than 12: a Muon step has a fixed cost besides its batch. Muon's momentum is 0.8, not 0.95: a run of a
# couple of hundred steps gains from averaging its gradients over the last few steps, not the last twenty.
# Figures in RESULTS.md.
# The race is to the trained model, as nanoGPT's is; evaluate the whole validation split afterwards with
#   python train.py --out_dir=checkpoint/speedrun_shakespeare_char --eval_only
out_dir = "checkpoint/speedrun_shakespeare_char"
dataset = "shakespeare_char"
eval_interval = 210  # one quick estimate, at the end: the whole split is --eval_only's, afterwards
eval_iters = 5
log_interval = 40
plot = False
final_eval = False

batch_size = 16
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
muon_momentum = 0.8
learning_rate = 2e-3  # AdamW's, for the embedding and the gains
max_iters = 210
lr_schedule = "wsd"
decay_frac = 0.4
warmup_iters = 25
lr_decay_iters = 210
min_lr = 0.0
