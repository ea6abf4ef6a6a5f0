# LoRA fine-tuning on Shakespeare with the GPT-2 tokenizer (python prepare.py): GPT-2 124M stays frozen,
# and rank-8 adapters beside attention's q, k, v matmul train (the log's first line counts them).
#   python train.py config/finetune_shakespeare_lora.py                                  # GPT-2 from the hub
#   python train.py config/finetune_shakespeare_lora.py --init_from=hf:path/to/gpt2      # a local copy of it
#   python train.py config/finetune_shakespeare_lora.py --init_from=checkpoint/c4/ckpt.pt  # a run of your own
# It expects the base model where init_from says, unchanged for as long as the run is used: the checkpoint
# holds only the adapters, and sample.py, export_hf.py and resuming rebuild the base and check its sha256.
init_from = "gpt2"
out_dir = "checkpoint/finetune_shakespeare_lora"
dataset = "shakespeare"
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # keep only improvements: fine-tuning overfits quickly

batch_size = 8
block_size = 256  # shorter than GPT-2's 1024: position embeddings are cropped
gradient_accumulation_steps = 4

lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "c_attn"  # add ,c_proj,c_fc to adapt every matmul of the blocks

# adapters start at zero and are few, so they take a larger rate than full fine-tuning; the usual LoRA
# choice, not tuned here
learning_rate = 1e-3
decay_lr = False
weight_decay = 0.0
max_iters = 500
