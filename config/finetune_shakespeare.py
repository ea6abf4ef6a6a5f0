# Fine-tune a trained GPT on Shakespeare with the GPT-2 tokenizer (python prepare.py):
#   python train.py config/finetune_shakespeare.py --init_from=checkpoint/c4/ckpt.pt
#   python train.py config/finetune_shakespeare.py --init_from=hf:path/to/gpt2   # a Hugging Face GPT-2 folder
#   python train.py config/finetune_shakespeare.py --init_from=gpt2              # from the hub, when reachable
# The architecture comes from the checkpoint; the optimizer and schedule start fresh. A checkpoint
# whose tokenizer differs from the dataset's is refused.
init_from = "checkpoint/c4/ckpt.pt"
out_dir = "checkpoint/finetune_shakespeare"
dataset = "shakespeare"
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # keep only improvements: fine-tuning overfits quickly

batch_size = 8
block_size = 256  # shorter than the source's context is fine: position embeddings are cropped
gradient_accumulation_steps = 4
dropout = 0.1  # regularises the small dataset; set 0.0 to turn it off

learning_rate = 3e-5  # a small constant rate: the weights are already good
decay_lr = False
max_iters = 500
