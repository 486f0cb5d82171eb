"""GaLore fine-tuning of a released LLaMA-family checkpoint (paper Sec. 5.6, Table 7).

Run (after `python -m train.tiny_checkpoint --output_dir=/tmp/tiny-llama`, or with any local
Hugging Face LLaMA-family directory with a SentencePiece `tokenizer.model` or a `tokenizer.json`):

  python -m train.main --config=configs/finetune.py --workdir=runs/ft \
      --config.init_from=/tmp/tiny-llama --config.export_to=runs/ft/hf

Data: documents in the C4 layout (`--config.data.data_dir` of `python -m train.prepare_data`;
default the bundled sample), or instruction / chat JSON-lines with the loss on the responses
(`--config.data.format=instruct --config.data.train_files=...`; docs/guides/finetuning.md, which
also lists the overrides that fit an 8B fine-tune in 20 GB). Where each number comes from:

* rank 128: the paper's LLM fine-tuning runs (OpenAssistant / Belle, LLaMA-7B, "r=128",
  paper Sec. 5.6). GLUE used r=4 / r=8 on RoBERTa-base (Table 4). Capped to the checkpoint's
  smallest GaLore matrix by hand for tiny models (the trainer says so if it is too large).
* scale 2.0: Table 7's alpha for r=8 (r=4 used 4); the paper gives none for r=128.
* learning_rate 2e-5: the middle of Table 7's fine-tuning rates (1e-5 .. 3e-5).
* update_proj_gap 500: the GLUE README's command (Table 7 does not list T).
* batch 16 sequences: Table 7 (CoLA 32); eps 1e-6, weight decay 0: GaLoreAdamW's defaults as
  the reference's run_glue.py uses them (github.com/jiaweizzhao/GaLore).
* warmup 0 and decay to 0: Hugging Face Trainer's defaults that run_glue.py inherits (linear
  there; cosine here, this trainer's only schedule).
* seq_len 512: Table 7's max sequence length.
* bf16 parameters: what fits a 7B fine-tune on one GPU (README's memory tables); not a paper
  number (its GLUE runs are fp32 RoBERTa).
"""

from configs import default


def get_config():
  """Returns the config."""
  c = default.get_config()
  c.init_from = ""  # set to the Hugging Face checkpoint directory to fine-tune
  c.export_to = ""  # e.g. runs/ft/hf: the fine-tuned weights as a Hugging Face directory
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.optimizer.name = "galore_adamw"
  c.optimizer.rank = 128
  c.optimizer.scale = 2.0
  c.optimizer.learning_rate = 2e-5
  c.optimizer.update_proj_gap = 500
  c.optimizer.warmup_fraction = 0.0
  c.optimizer.min_lr_ratio = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.eps = 1e-6
  c.data.seq_len = 512
  c.train.batch_size = 16
  c.train.num_steps = 1000
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return c
