"""The embedded default: LLaMA-9m with GaLore on the bundled C4 sample, ~10 min on 2 CPU cores.

Run: `python -m train.main --config=configs/default.py --workdir=runs/default`
Override any field: `--config.optimizer.rank=64 --config.train.num_steps=50`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default training configuration."""
  c = ml_collections.ConfigDict()
  # Fine-tuning: a local Hugging Face LLaMA/Mistral directory (config.json + safetensors) whose
  # weights, shapes and SentencePiece tokenizer.model the run starts from (model.size and its
  # shape overrides are then unused); "" = random init. Optimizer state always starts fresh.
  c.init_from = ""
  c.export_to = ""  # write the final weights here as a Hugging Face directory; "" = don't

  c.model = ml_collections.ConfigDict()
  c.model.size = "9m"  # one of train.model.LLAMA_SIZES (9m ... 7b)
  c.model.hidden_dim = 0  # override D of the size; 0 = keep the size's value
  c.model.mlp_dim = 0  # override F; 0 = keep
  c.model.num_heads = 0  # override H; 0 = keep
  c.model.num_layers = 0  # override N; 0 = keep
  c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (the paper's pure bf16)
  c.model.param_dtype = "float32"  # parameter (and optimizer-moment) dtype
  c.model.scan_layers = True  # stack layers [N, in, out] and run them with nnx.scan
  c.model.remat_policy = "none"  # activation remat per block: none/full/dots_saveable/...
  # Attention over chunks of this many queries, each recomputed in the backward pass: the
  # [B, H, L, L] scores exist one chunk at a time (exact). 0 = all queries at once.
  c.model.attention_chunk_size = 0
  # Loss over chunks of this many positions (all rows), backward fused in (train/losses.py): the
  # [B, L, V] float32 logits and their gradient never exist. 0 = full logits (the old path).
  c.model.loss_chunk_size = 16

  c.data = ml_collections.ConfigDict()
  # "c4": documents of a prepared tfds C4 (the fields below); "instruct": JSON-lines chat /
  # prompt-response / text records with the loss on response tokens only (train/instruct.py),
  # tokenised with the checkpoint's tokenizer.json (init_from) or data.vocab_path.
  c.data.format = "c4"
  c.data.train_files = ""  # instruct: comma-separated JSON-lines files to train on
  c.data.eval_files = ""  # instruct: comma-separated files whose response-token loss is eval_loss
  c.data.strict = False  # instruct: stop at the first bad record (file:line) instead of skipping
  c.data.data_dir = ""  # tfds data dir with c4/en/3.1.0; "" = the bundled sample (data/tfds)
  c.data.vocab_path = ""  # SentencePiece model; "" = the bundled T5 vocabulary
  c.data.seq_len = 256  # tokens per sequence, L (the paper: 256)
  c.data.mode = "pad"  # "pad": one document per row (the paper's); "pack": concatenated
  c.data.train_split = "train"  # tfds split (slices allowed, e.g. "train[:90%]")
  c.data.eval_split = "validation"  # tfds split evaluated for perplexity
  c.data.eval_max_documents = 0  # evaluate only the first N validation documents; 0 = all
  c.data.seed = 0  # shuffle seed of the training stream
  c.data.worker_count = 0  # grain worker processes for tokenisation (0 = in-process)

  c.optimizer = ml_collections.ConfigDict()
  # galore_adamw | adamw | galore | adamw_8bit | galore_adamw_8bit, or the paper's low-rank
  # baselines (train/lowrank.py): lora | relora | low_rank
  c.optimizer.name = "galore_adamw"
  c.optimizer.inner = "adafactor"  # name="galore"'s inner: adam | adafactor | lion | sgd (b1)
  c.optimizer.learning_rate = 0.01  # peak learning rate (the paper: 0.01 for GaLore)
  c.optimizer.warmup_fraction = 0.1  # linear warmup from 0 over this fraction of steps
  c.optimizer.min_lr_ratio = 0.1  # cosine decays to this fraction of the peak
  c.optimizer.b1 = 0.9  # Adam first-moment decay
  c.optimizer.b2 = 0.999  # Adam second-moment decay
  c.optimizer.eps = 1e-6  # Adam epsilon (GaLoreAdamW's default, added to sqrt(v))
  c.optimizer.weight_decay = 0.0  # decoupled weight decay (the paper: 0)
  c.optimizer.grad_clip_norm = 0.0  # global-norm clipping threshold; 0 = off
  # adamw: learning-rate multiplier of the attention/MLP kernels (GaLore's targets); 1 = one lr
  c.optimizer.target_lr_scale = 1.0
  c.optimizer.rank = 32  # GaLore rank r (also the factors' rank of lora/relora/low_rank)
  c.optimizer.lora_alpha = 32.0  # lora/relora: the factors' product is scaled by alpha / rank
  c.optimizer.relora_reset_every = 50  # relora: merge the factors into the kernels every N steps
  c.optimizer.relora_restart_warmup = 5  # relora: steps of linear lr warmup after each merge
  c.optimizer.update_proj_gap = 50  # GaLore refresh period T in steps
  c.optimizer.scale = 0.25  # GaLore alpha: multiplies projected updates
  c.optimizer.proj_type = "std"  # std | reverse_std | left | right | full
  c.optimizer.subspace_method = "svd"  # svd (exact) | randomized (warm-started range finder)
  c.optimizer.oversample = 8  # randomized: extra sketch columns
  c.optimizer.power_iters = 1  # randomized: subspace iterations
  # randomized: certified fraction of the exact top-r energy to iterate to (e.g. 0.99), per
  # matrix, up to max_power_iters; 0 = off (fixed power_iters). Logged at refreshes.
  c.optimizer.energy_tol = 0.0
  c.optimizer.max_power_iters = 8  # randomized with energy_tol: most subspace iterations
  c.optimizer.on_refresh = "keep"  # moments at a refresh: keep (reference) | reset | rotate
  c.optimizer.align_signs = False  # flip new basis vectors to agree with the previous ones
  # 8-bit optimizers: embedding and head moments stay float32 (bitsandbytes' advice, see README)
  c.optimizer.float32_vocab_moments = False
  c.optimizer.projector_dtype = ""  # projector storage dtype; "" = parameter dtype
  # GaLore on the token embedding and LM head too (rank `rank`, projector on the hidden side D):
  # their optimizer state shrinks from V x D to V x r moments; with
  # train.fused_vocab_chunk_size the fused step refreshes them by vocabulary chunks.
  c.optimizer.galore_vocab = False

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 150  # optimizer updates
  c.train.batch_size = 16  # sequences per update (global)
  c.train.grad_accum_steps = 1  # micro-batches per update; must divide batch_size
  c.train.seed = 0  # model init and step RNG
  c.train.eval_every = 50  # evaluate every N updates (and at the end)
  c.train.eval_batch_size = 32  # sequences per eval batch
  c.train.log_every = 10  # write train metrics every N updates
  c.train.checkpoint_every = 50  # save every N updates (and at the end)
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  c.train.fused_update = False  # layer-wise fused backward+update (needs scan_layers)
  # Fused step: the LM head's and embedding's gradients and updates at most this many vocabulary
  # entries at a time, so no [V, D] gradient exists (needs model.loss_chunk_size > 0 and
  # grad_accum_steps 1; rounded down so 8-bit state blocks split). 0: whole leaves.
  c.train.fused_vocab_chunk_size = 0
  c.train.clip_in_subspace = False  # fused + accumulation + GaLore: clip by the projected norm
  c.train.progress_bar = True  # tqdm progress bar on stderr
  c.train.stop_after_steps = 0  # stop (with a checkpoint) after this many steps; 0 = num_steps

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size; -1 = all remaining devices
  c.mesh.fsdp = 1  # fully-sharded axis size (parameters and optimizer state)
  c.mesh.shard_projectors = True  # split GaLore projectors over fsdp (False: replicated)
  c.mesh.distributed = "auto"  # multi-process init: auto (JAX_*/SLURM/Open MPI env) | on | off
  return c
