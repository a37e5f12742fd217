"""Every axolotl config key and what lorafit does with it: the compatibility table, as data.

Two tables, one per level: :data:`TOP_LEVEL` (the YAML's keys) and :data:`DATASET_LEVEL` (the keys of an entry of
``datasets`` / ``test_datasets``). Each maps an axolotl key to ``(status, message)``:

* ``supported``: a field of :class:`~lorafit.config.TrainConfig` / :class:`~lorafit.config.DatasetSpec`
  (``message`` is empty, or says how it differs);
* ``ignored``: accepted; when set (not empty/false/0) the user sees ``key: ignored: message``;
* ``unsupported``: an error when set, ``message`` is the one-line reason and what to do instead.

The keys are those of axolotl's pydantic schema (``src/axolotl/utils/schemas/``: the input config and its mixins,
the SFT dataset entry) and of its bundled plugins' arguments (``src/axolotl/integrations/*/args.py``), as of
axolotl's main branch in mid 2026, plus a few older keys still found in configs. ``lorafit.config.keys`` screens
a config's keys with these tables; ``tests/test_axolotl_keys.py`` walks them, and checks the README's table.
"""

from __future__ import annotations

SUPPORTED, IGNORED, UNSUPPORTED = "supported", "ignored", "unsupported"
STATUSES = (SUPPORTED, IGNORED, UNSUPPORTED)

# axolotl keys lorafit reads under another name (the axolotl name is screened as supported, then renamed)
RENAMED = {"peft_layers_to_transform": "lora_layers_to_transform", "dpo_beta": "rl_beta"}

# ---- reasons, shared by groups of keys ----
_LOGGING = "no tracker is contacted; lorafit logs to the terminal and output_dir/metrics.jsonl"
_LEAN = "a GPU speed-up switch; lorafit's own lean kernels run instead"
_ATTN = "lorafit uses the model's SDPA attention (set attn_implementation to choose)"
_HUB = "nothing is uploaded"
_PREP = "lorafit tokenizes datasets at start-up and keeps no prepared copy"
_LOADER = "lorafit's data loader runs in the training process"
_NOTHING = "it changes nothing in a lorafit run"
_MODEL_CLASS = "lorafit loads every model with AutoModelForCausalLM and its tokenizer with AutoTokenizer"
_GEN = "no samples are generated during training; run lorafit eval on the saved adapter"
_MULTI = ("lorafit trains on several devices with torchrun: DDP, or FSDP2 with fsdp_version: 2; "
          "this kind of parallelism is not supported, remove it")
_QUANT = ("quantized bases other than bitsandbytes 4-bit and MXFP4 dequantized on load (GPTQ, FP8, NVFP4, torchao) are"
          " not supported; use adapter: qlora with load_in_4bit: true, or LoRA on a bf16/fp32 base")
_OPTIM = "not supported; use optimizer adamw_torch (with weight_decay, adam_beta1/2, adam_epsilon)"
_SCHED = "not supported; use lr_scheduler cosine, linear, constant or constant_with_warmup"
_RL = ("this preference/RL method or option is not supported; lorafit trains rl: dpo (sigmoid loss) and rl: kto"
       " with an adapter, and rl: orpo")
_MM = "vision and multimodal models are not supported; lorafit fine-tunes text-only decoder models"
_DISTILL = "knowledge distillation is not supported; train on the teacher's outputs as plain chat data"
_PRETRAIN = "streaming pretraining datasets are not supported; use datasets with type: completion"
_OFFLOAD = ("activations and layers stay on the device (this changes memory, not results); check the fit with"
            " lorafit plan")
_MOE_PARALLEL = "expert parallelism is not supported yet; shard with FSDP2 (fsdp_version: 2) or train on one device"


def _group(status: str, message: str, keys: str) -> dict[str, tuple[str, str]]:
    return {k: (status, message) for k in keys.split()}


TOP_LEVEL: dict[str, tuple[str, str]] = {
    # ---- supported: the fields of TrainConfig ----
    **_group(SUPPORTED, "", """
        base_model tokenizer_config chat_template chat_template_jinja attn_implementation special_tokens
        eot_tokens train_on_eos default_system_message chat_template_kwargs batch_size max_memory
        adapter lora_model_dir lora_r lora_alpha lora_dropout lora_target_modules lora_target_linear
        lora_modules_to_save peft_use_rslora peft_use_dora peft_layers_to_transform lora_rank_pattern
        lora_alpha_pattern load_in_4bit load_in_8bit bnb_config_kwargs
        datasets test_datasets val_set_size sequence_len sample_packing pad_to_sequence_len train_on_inputs
        curriculum_sampling dataset_exact_deduplication
        micro_batch_size gradient_accumulation_steps num_epochs max_steps learning_rate lr_scheduler warmup_steps
        warmup_ratio optimizer weight_decay adam_beta1 adam_beta2 adam_epsilon max_grad_norm gradient_checkpointing
        bf16 tf32 eval_steps evals_per_epoch save_steps saves_per_epoch save_total_limit logging_steps output_dir
        seed resume_from_checkpoint"""),
    "fsdp": (SUPPORTED, "FSDP2 (fully_shard per decoder layer; a 4-bit or 8-bit base's codes are sharded too) under "
                        "torchrun; the list's options are not read"),
    "fsdp_config": (SUPPORTED, "FSDP2 under torchrun; reshard_after_forward is read, other keys are not"),
    "fsdp_version": (SUPPORTED, "2 only (FSDP2)"),
    "lora_target_parameters": (SUPPORTED, "PEFT's target_parameters (MoE experts' 3-D tensors); lora_dropout must"
                               " be 0, as in PEFT"),
    "quantize_moe_experts": (SUPPORTED, "the routed experts' 3-D tensors in 4 or 8 bits (as the base), dequantized"
                             " when read"),
    "model_quantization_config": (SUPPORTED, "Mxfp4Config only, with model_quantization_config_kwargs: {dequantize:"
                                  " true}: an MXFP4 checkpoint (gpt-oss) is dequantized to the training dtype as it"
                                  " loads (lorafit does so for any MXFP4 checkpoint)"),
    "model_quantization_config_kwargs": (SUPPORTED, "{dequantize: true} with model_quantization_config: Mxfp4Config"),
    "fp16": (SUPPORTED, "fp16 base with fp32 LoRA weights and dynamic loss scaling (torch's GradScaler); bf16: true "
                        "wins over it, as in axolotl; full fine-tuning, lora_modules_to_save and FSDP2 are refused"),
    # ---- ignored: logging integrations ----
    **_group(IGNORED, _LOGGING, """
        use_wandb wandb_name wandb_run_id wandb_mode wandb_project wandb_entity wandb_watch wandb_log_model
        use_mlflow mlflow_tracking_uri mlflow_experiment_name mlflow_run_name hf_mlflow_log_artifacts
        use_comet comet_api_key comet_workspace comet_project_name comet_experiment_key comet_mode comet_online
        comet_experiment_config use_trackio trackio_project_name trackio_run_name trackio_space_id
        use_otel_metrics otel_metrics_host otel_metrics_port use_tensorboard
        use_swanlab swanlab_project swanlab_experiment_name swanlab_description swanlab_mode swanlab_workspace
        swanlab_api_key swanlab_log_model swanlab_web_host swanlab_api_host swanlab_lark_webhook_url
        swanlab_lark_secret swanlab_log_completions swanlab_completion_log_interval swanlab_completion_max_buffer
        profiler_steps profiler_steps_start include_tokens_per_second include_tkps"""),
    # ---- ignored: speed-only switches on GPUs ----
    **_group(IGNORED, _LEAN, """
        use_kernels liger_rope liger_rms_norm liger_rms_norm_gated liger_layer_norm liger_swiglu
        liger_glu_activation liger_cross_entropy liger_fused_linear_cross_entropy liger_use_token_scaling
        cut_cross_entropy chunked_cross_entropy chunked_cross_entropy_num_chunks flash_attn_cross_entropy
        flash_attn_rms_norm flash_attn_fuse_qkv flash_attn_fuse_mlp flash_optimum lora_mlp_kernel lora_qkv_kernel
        lora_o_kernel lora_embedding_kernel fused_attn_kernel tiled_mlp tiled_mlp_num_shards
        tiled_mlp_use_original_mlp torch_compile torch_compile_backend torch_compile_mode torch_compile_options
        flex_attn_compile_kwargs sdpa_varlen flash_attn_d512 large_head_attention gemma4_hybrid_attn_impl
        experts_implementation expert_backend moe_grouped_backend moe_dequant_chunk_size use_scattermoe
        use_sonicmoe use_dsv4_kernels use_glm_dsa_kernels dense_mixer batch_flattening multipack_real_batches
        sample_packing_group_size sample_packing_bin_size sample_packing_sequentially
        sample_packing_mp_start_method sample_packing_eff_est pad_to_multiple_of lora_on_cpu
        experimental_skip_move_to_device low_cpu_mem_usage"""),
    **_group(IGNORED, _ATTN, """
        flash_attention xformers_attention sdp_attention flex_attention sage_attention eager_attention
        s2_attention"""),
    # ---- ignored: data preparation, loaders, uploads, housekeeping ----
    **_group(IGNORED, _PREP, """
        dataset_prepared_path push_dataset_to_hub skip_prepare_dataset num_dataset_shards_to_save
        dataset_processes dataset_num_proc dataset_keep_in_memory is_preprocess preprocess_iterable
        total_num_tokens total_supervised_tokens"""),
    **_group(IGNORED, _LOADER, """
        dataloader_pin_memory dataloader_num_workers dataloader_prefetch_factor remove_unused_columns
        accelerator_config"""),
    **_group(IGNORED, _HUB, "hub_model_id hub_strategy hub_revision hf_use_auth_token"),
    **_group(IGNORED, _NOTHING, """
        strict debug local_rank axolotl_config_path is_falcon_derived_model is_llama_derived_model
        is_mistral_derived_model is_qwen_derived_model gc_steps torch_empty_cache_steps gc_collect_steps
        tokenizer_save_jinja_files peft_autocast_adapter_dtype"""),
    "device": (IGNORED, "lorafit chooses the device itself"),
    "save_first_step": (IGNORED, "checkpoints are written every save_steps"),
    "save_only_model": (IGNORED, "checkpoints always hold the optimizer state, so a run can resume"),
    "loss_watchdog_threshold": (IGNORED, "lorafit stops on a NaN/inf loss only"),
    "loss_watchdog_patience": (IGNORED, "lorafit stops on a NaN/inf loss only"),
    "lora_fan_in_fan_out": (IGNORED, "lorafit sees Conv1D (fan-in-fan-out) layers by their type"),
    **_group(IGNORED, _MODEL_CLASS, """
        model_type type_of_model tokenizer_type tokenizer_use_fast tokenizer_legacy trainer_cls"""),
    **_group(IGNORED, _GEN, """
        generate_samples num_generation_samples generation_max_new_tokens generation_temperature generation_top_p
        generation_top_k generation_prompt_ratio generation_do_sample eval_table_size eval_max_new_tokens
        gradio_title gradio_share gradio_server_name gradio_server_port gradio_max_new_tokens
        gradio_temperature"""),
    "trust_remote_code": (IGNORED, "lorafit never runs code shipped with a model"),
    "tokenizer_use_mistral_common": (IGNORED, "lorafit uses the model folder's Hugging Face tokenizer"),
    "plugins": (IGNORED, "axolotl plugins do not run here; their keys are screened like any other"),
    "eval_sample_packing": (IGNORED, "evaluation batches follow sample_packing"),
    "eval_strategy": (SUPPORTED, "no: no evaluation while training; steps / epoch: as eval_steps / evals_per_epoch"
                      " say, and epoch alone after each epoch"),
    "evaluation_strategy": (IGNORED, "use eval_strategy, eval_steps or evals_per_epoch"),
    "save_strategy": (IGNORED, "use save_steps or saves_per_epoch"),
    "save_safetensors": (IGNORED, "adapters are always saved as safetensors"),
    "auto_resume_from_checkpoints": (IGNORED, "set resume_from_checkpoint to resume"),
    "early_stopping_patience": (IGNORED, "early stopping is not supported yet; the run trains its full length"),
    "load_best_model_at_end": (IGNORED, "the last adapter is saved; checkpoints keep the earlier ones"),
    "metric_for_best_model": (IGNORED, "the last adapter is saved; checkpoints keep the earlier ones"),
    "greater_is_better": (IGNORED, "the last adapter is saved; checkpoints keep the earlier ones"),
    "gradient_checkpointing_kwargs": (IGNORED, "lorafit always uses non-reentrant checkpointing"),
    "cosine_min_lr_ratio": (IGNORED, "the cosine schedule decays to 0"),
    "group_by_length": (IGNORED, "batches keep the data's (shuffled) order"),
    "shuffle_merged_datasets": (IGNORED, "lorafit shuffles the merged rows with seed"),
    "shuffle_before_merging_datasets": (IGNORED, "lorafit shuffles the merged rows with seed"),
    "dataloader_drop_last": (IGNORED, "a last partial batch is kept"),
    "max_packed_sequence_len": (IGNORED, "sequence_len bounds packed rows"),
    "eval_batch_size": (IGNORED, "evaluation uses micro_batch_size"),
    "eval_sequence_len": (IGNORED, "evaluation uses sequence_len"),
    "device_map": (IGNORED, "lorafit puts the whole model on one device"),
    "gpu_memory_limit": (IGNORED, "lorafit puts the whole model on one device"),
    "world_size": (IGNORED, "lorafit trains on one device"),
    "ddp_timeout": (IGNORED, "lorafit trains on one device"),
    "ddp_bucket_cap_mb": (IGNORED, "lorafit trains on one device"),
    "ddp_broadcast_buffers": (IGNORED, "lorafit trains on one device"),
    "ddp_find_unused_parameters": (IGNORED, "lorafit trains on one device"),
    "resize_token_embeddings_to_32x": (IGNORED, "embeddings are resized only for new special tokens"),
    "mean_resizing_embeddings": (IGNORED, "embeddings are resized only for new special tokens"),
    "shrink_embeddings": (IGNORED, "embeddings are resized only for new special tokens"),
    "embeddings_skip_upcast": (IGNORED, "embeddings keep the base's dtype"),
    "fp32_norms": (IGNORED, "lorafit's norm kernels compute in fp32 already"),
    "fp32_norm_classes": (IGNORED, "lorafit's norm kernels compute in fp32 already"),
    "bfloat16": (IGNORED, "set bf16 or fp16 to choose the dtype"),
    "float16": (IGNORED, "set bf16 or fp16 to choose the dtype"),
    "float32": (IGNORED, "set bf16 or fp16 to choose the dtype"),
    "do_causal_lm_eval": (IGNORED, "evaluation reports loss and perplexity; run lorafit eval for more"),
    "eval_causal_lm_metrics": (IGNORED, "evaluation reports loss and perplexity; run lorafit eval for more"),
    "lm_eval_tasks": (IGNORED, "lm-eval-harness is not run; run lorafit eval on the saved adapter"),
    "lm_eval_batch_size": (IGNORED, "lm-eval-harness is not run; run lorafit eval on the saved adapter"),
    "lm_eval_post_train": (IGNORED, "lm-eval-harness is not run; run lorafit eval on the saved adapter"),
    "lm_eval_model": (IGNORED, "lm-eval-harness is not run; run lorafit eval on the saved adapter"),
    "merge_lora": (IGNORED, "the adapter is saved unmerged; merge it with lorafit's merge command afterwards"),
    "merge_method": (IGNORED, "the adapter is saved unmerged; merge it with lorafit's merge command afterwards"),
    "excess_length_strategy": (IGNORED, "rows longer than sequence_len are truncated"),
    # ---- unsupported: other issues' features ----
    "deepspeed": (SUPPORTED, "DeepSpeed does not run: its ZeRO stage picks FSDP2 (stage 3) or DDP (1, 2), with"
                             " a notice"),
    **_group(UNSUPPORTED, _MULTI, """
        deepcompile fsdp_final_state_dict_type
        fp8_enable_fsdp_float8_all_gather dp_shard_size dp_replicate_size sequence_parallel_degree
        context_parallel_size heads_k_stride ring_attn_func tensor_parallel_size ddp use_ray ray_run_name
        ray_num_workers resources_per_worker"""),
    "qlora_sharded_model_loading": (IGNORED, "every rank loads and quantizes the whole base, then FSDP2 shards its "
                                             "4-bit codes (more host memory while loading, the same training)"),
    **_group(UNSUPPORTED, _MOE_PARALLEL, """
        expert_parallel_size expert_parallel_backend expert_parallel_num_nvl_bytes expert_parallel_num_rdma_bytes
        expert_parallel_token_capacity expert_parallel_fallback_on_unsupported"""),
    **_group(UNSUPPORTED, _QUANT, """
        gptq gptq_groupsize gptq_model_v1 gptq_disable_exllama
        use_onebitllms fp8 qat quantization llmcompressor nonexpert_quantization
        moe_bnb_fast dsv4_fp8_nonexpert_mode dsv4_fp8_lora_kernel dsv4_shared_mlp_lora_kernel dsv4_bf16_all
        dsv4_fp4_grouped_mode gemma4_fp8_nonexpert gemma4_nf4_nonexpert nvfp4_merge_aware
        nvfp4_merge_aware_start_step"""),
    # ---- preference training (lorafit.train.preference) ----
    "rl": (SUPPORTED, "dpo, orpo or kto, with an adapter (orpo also fully fine-tunes); datasets of the preference"
                      " types"),
    "rl_beta": (SUPPORTED, "DPO's and KTO's beta (default 0.1, as TRL); with rl: orpo, ORPO's weight when set, as"
                " axolotl passes it"),
    "kto_desirable_weight": (SUPPORTED, "KTO's weight of the desirable rows' loss (default 1.0)"),
    "kto_undesirable_weight": (SUPPORTED, "KTO's weight of the undesirable rows' loss (default 1.0)"),
    "dpo_beta": (SUPPORTED, "read as rl_beta, as axolotl does"),
    "orpo_alpha": (SUPPORTED, "ORPO's weight of the odds-ratio term (TRL's ORPO beta, default 0.1)"),
    "dpo_label_smoothing": (IGNORED, "TRL's sigmoid DPO loss, which lorafit and axolotl run, does not use it (TRL"
                            " applies it to robust DPO and EXO, which lorafit does not run)"),
    # ---- unsupported: features lorafit does not have ----
    **_group(UNSUPPORTED, _RL, """
        trl vllm ebft reward_model process_reward_model center_rewards_coefficient num_labels
        dpo_use_weighting precompute_ref_log_probs dpo_use_liger_kernel dpo_padding_free
        dpo_loss_type dpo_loss_weights dpo_use_logits_to_keep dpo_generate_during_eval dpo_norm_loss
        rpo_alpha simpo_gamma cpo_alpha
        nemo_gym_enabled nemo_gym_dir nemo_gym_auto_clone nemo_gym_config_paths nemo_gym_head_port
        nemo_gym_server_timeout nemo_gym_verify_timeout nemo_gym_run_timeout nemo_gym_datasets
        nemo_gym_auto_start nemo_gym_model_name nemo_gym_multi_turn nemo_gym_max_turns hatchery cls_model_config"""),
    **_group(UNSUPPORTED, _MM, """
        processor_type processor_kwargs image_size image_resize_algorithm role_boundaries freeze_mm_modules"""),
    **_group(UNSUPPORTED, _DISTILL, """
        kd_trainer kd_ce_alpha kd_alpha kd_temperature kd_beta kd_normalize_topk kd_online_server_base_url
        kd_online_topk kd_online_server kd_online_timeout kd_temperature_min"""),
    **_group(UNSUPPORTED, _PRETRAIN, """
        pretraining_dataset streaming streaming_multipack_buffer_size pretrain_multipack_buffer_size
        pretrain_multipack_attn pretraining_sample_concatenation"""),
    **_group(UNSUPPORTED, _OPTIM, """
        optim_args optim_target_modules torchdistx_path adam_epsilon2 adam_beta3 dion_lr dion_momentum
        dion_rank_fraction dion_rank_multiple_of qgalore_rank qgalore_update_proj_gap qgalore_scale
        qgalore_proj_type qgalore_proj_quant qgalore_proj_bits qgalore_proj_group_size qgalore_cos_threshold
        qgalore_gamma_proj qgalore_queue_size grokfast_alpha grokfast_lamb"""),
    **_group(UNSUPPORTED, _SCHED, """
        lr_scheduler_kwargs lr_quadratic_warmup cosine_constant_lr_ratio lr_div_factor jagged_restart_steps
        jagged_restart_warmup_steps jagged_restart_anneal_steps"""),
    **_group(IGNORED, _OFFLOAD, "activation_offloading layer_offloading"),
    **_group(UNSUPPORTED, "ReLoRA is not supported; train one adapter (lora_model_dir continues an earlier one)",
             "relora relora_steps relora_warmup_steps relora_anneal_steps relora_prune_ratio relora_prune_method"
             " relora_cpu_offload"),
    **_group(UNSUPPORTED, "PoSE context extension is not supported; train at the sequence_len you need",
             "use_pose pose_split_on_token_ids pose_max_context_len pose_num_chunks"),
    **_group(UNSUPPORTED, "LISA layer sampling is not supported; use lora_layers_to_transform",
             "lisa_n_layers lisa_step_interval lisa_layers_attribute"),
    **_group(UNSUPPORTED, "Spectrum parameter selection is not supported; use lora_target_modules",
             "spectrum_top_fraction spectrum_model_name"),
    **_group(UNSUPPORTED, "diffusion language-model training is not supported", "diffusion"),
    **_group(UNSUPPORTED, "MoRA is not supported; use adapter: lora", "mora"),
    "loraplus_lr_ratio": (SUPPORTED, "LoRA+ as axolotl runs it (PEFT's create_loraplus_optimizer): B at lr × ratio,"
                          " no weight decay"),
    "loraplus_lr_embedding": (SUPPORTED, "LoRA+: the learning rate of LoRA on embeddings (default 1e-6, as PEFT)"),
    **_group(UNSUPPORTED, "per-group learning rates are not supported yet; one learning_rate applies to all",
             "lr_groups embedding_lr embedding_lr_scale"),
    **_group(UNSUPPORTED, "the bench and EAFT evaluation/loss extras are not supported",
             "do_bench_eval bench_dataset bench_split use_eaft eaft_alpha eaft_k"),
    **_group(UNSUPPORTED, "softmax scaling is not supported; lorafit trains the model's attention as it is",
             "scaling_softmax scaling_softmax_factor scaling_softmax_bias"),
    **_group(UNSUPPORTED, "selective or dynamic checkpointing is not supported; set gradient_checkpointing: true",
             "selective_checkpointing dynamic_checkpoint"),
    **_group(UNSUPPORTED, "changing the model's config or load arguments is not supported; lorafit loads the base"
             " as its folder describes it", """
             overrides_of_model_config overrides_of_model_kwargs model_kwargs rope_scaling"""),
    # not a field of axolotl's schema: its validated config drops the key, so an axolotl run ignores it too
    "model_config": (IGNORED, "axolotl's schema drops this key, so it changes nothing in an axolotl run either; "
                     "overrides_of_model_config is axolotl's key for config changes (not supported here)"),
    **_group(IGNORED, "lorafit reads the model, its config and its revision from base_model's folder",
             "base_model_config revision_of_model model_revision"),
    "llama4_linearized_experts": (SUPPORTED, "Llama 4's routed experts as per-expert linear layers (gate_projs.N,"
                                  " up_projs.N, down_projs.N) from a fused or a linearized checkpoint; merged models"
                                  " are written fused, in transformers' layout"),
    "peft_layers_pattern": (UNSUPPORTED, "not supported; lorafit finds the layer index in the module name"),
    "peft": (UNSUPPORTED, "LoftQ initialisation is not supported; use lora_init: pissa or the default"),
    "peft_layer_replication": (UNSUPPORTED, "layer replication is not supported"),
    "peft_init_lora_weights": (UNSUPPORTED, "not supported; use lora_init: kaiming, gaussian or pissa"),
    "peft_trainable_token_indices": (UNSUPPORTED, "training single token rows is not supported yet; use"
                                     " lora_modules_to_save: [embed_tokens, lm_head]"),
    "peft_ensure_weight_tying": (UNSUPPORTED, "PEFT's adapter tying (lm_head's LoRA made of embed_tokens' B and A"
                                 " transposed, one modules_to_save copy for both) is not implemented yet; remove it:"
                                 " a tied head and embeddings are then adapted separately, as PEFT does by default"),
    "unfrozen_parameters": (SUPPORTED, "full fine-tuning of the matched parameters (axolotl's patterns and row"
                            " ranges), every other one frozen; with an adapter: ignored, with a notice, as axolotl does"
                            " not unfreeze under LoRA"),
    "tokens": (UNSUPPORTED, "adding plain tokens is not supported; add them as special_tokens"),
    "added_tokens_overrides": (UNSUPPORTED, "overriding tokenizer entries is not supported; edit the tokenizer"
                               " files"),
    "fix_untrained_tokens": (UNSUPPORTED, "not supported; train the embeddings with lora_modules_to_save"),
    "reinit_weights": (UNSUPPORTED, "training from scratch is not supported; lorafit fine-tunes a trained base"),
    "neftune_noise_alpha": (UNSUPPORTED, "NEFTune noise is not supported"),
    "noisy_embedding_alpha": (UNSUPPORTED, "NEFTune noise is not supported"),
    "auto_find_batch_size": (UNSUPPORTED, "not supported yet; set micro_batch_size (lorafit plan suggests one)"),
    "min_sample_len": (UNSUPPORTED, "not supported; filter short rows out of the file"),
    "max_prompt_len": (UNSUPPORTED, "not supported; rows are bounded by sequence_len"),
    "dataset_shard_num": (UNSUPPORTED, "sharding datasets is not supported; cut the file to the part you want"),
    "dataset_shard_idx": (UNSUPPORTED, "sharding datasets is not supported; cut the file to the part you want"),
}

DATASET_LEVEL: dict[str, tuple[str, str]] = {
    **_group(SUPPORTED, "", """
        path split type data_files ds_type name field field_messages message_field_role message_field_content
        message_property_mappings roles roles_to_train train_on_eos drop_system_message train_on_eot
        message_field_training split_thinking template_thinking_key field_thinking field_chosen field_rejected"""),
    "chat_template": (IGNORED, "the top-level chat_template applies to every dataset"),
    "chat_template_jinja": (IGNORED, "the top-level chat_template applies to every dataset"),
    "conversation": (IGNORED, "chat rows are rendered with the tokenizer's (or chat_template's) template"),
    "field_human": (IGNORED, "used by dataset types lorafit does not read"),
    "field_model": (IGNORED, "used by dataset types lorafit does not read"),
    "input_format": (IGNORED, "used by dataset types lorafit does not read"),
    "field_system": (IGNORED, "system turns come from the messages"),
    "field_tools": (IGNORED, "tool definitions are not passed to the chat template"),
    "message_field_training_detail": (IGNORED, "per-character training spans are not read; message_field_training"
                                      " and roles_to_train decide per message"),
    "preprocess_shards": (IGNORED, _PREP),
    "trust_remote_code": (IGNORED, "lorafit never runs code shipped with a dataset"),
    "revision": (IGNORED, "local files have no revision"),
    "shards": (UNSUPPORTED, "sharding datasets is not supported; cut the file to the part you want"),
    "shards_idx": (UNSUPPORTED, "sharding datasets is not supported; cut the file to the part you want"),
    "input_transform": (UNSUPPORTED, "dataset transforms run axolotl code; convert the file beforehand"),
    "logprobs_field": (UNSUPPORTED, _DISTILL),
    "temperature": (UNSUPPORTED, _DISTILL),
}

# Prefixes of keys screened as ignored logging/speed switches when the table does not list them (newer keys)
IGNORED_PREFIXES = {"wandb_": _LOGGING, "mlflow_": _LOGGING, "comet_": _LOGGING, "swanlab_": _LOGGING,
                    "trackio_": _LOGGING, "liger_": _LEAN}


def compatibility_markdown() -> str:
    """The README's compatibility section body: counts per status, then the unsupported keys grouped by reason.
    ``python -m lorafit.config.axolotl_keys`` prints it; ``tests/test_axolotl_keys.py`` checks the README."""
    lines = ["| level | supported | ignored (with a notice) | unsupported (an error) |", "|---|---|---|---|"]
    for level, table in (("top level", TOP_LEVEL), ("dataset entry", DATASET_LEVEL)):
        counts = [sum(1 for s, _ in table.values() if s == status) for status in STATUSES]
        lines.append(f"| {level} | " + " | ".join(map(str, counts)) + " |")
    lines += ["", "Unsupported keys, and what to do instead:", "", "| keys | reason |", "|---|---|"]
    for prefix, table in (("", TOP_LEVEL), ("datasets[].", DATASET_LEVEL)):
        by_reason: dict[str, list[str]] = {}
        for key, (status, message) in table.items():
            if status == UNSUPPORTED:
                by_reason.setdefault(message, []).append(key)
        for message, keys in by_reason.items():
            lines.append("| " + ", ".join(f"`{prefix}{k}`" for k in keys) + f" | {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(compatibility_markdown(), end="")
