"""The AnyID trainer: LoRA by module swap, SFT, Flow-DPO and the ID-group data pipeline.

Modules (plain, no registries):
    lora       inject / merge / disable / export LoRA on the DiT's nn.Linear layers
    config     typed dataclass configs read from TOML or JSON (SFTConfig, DPOConfig), ConfigError
    config_io  reading config files into the dataclasses: TOML / JSON, --set overrides, ConfigError
    preflight  checks everything a config names (paths, packages, device, resume) before a model loads
    groups     ID groups: the dataset folders and their meta.json
    references reference forms (face / portrait / clip); the detector and boxes are anyid_rt.person_crop
    prompts    AnyID's differential prompts, the calibrated description similarities, the builder and the check
    judge      a local language model judging element similarity (the paper's LLM step, pluggable)
    prompt_cli `anyid-rt prompt build|check|calibrate`
    data       training instances, buckets and the batch plan over ID groups
    pairs      preference pairs for Flow-DPO and their dataset
    cache      disk cache of VAE latents and prompt embeddings keyed by content hash
    sft        supervised training (AnyID section 4.2), `train_sft(cfg)`
    dpo        Flow-DPO (AnyID eq. 3-4), `train_dpo(cfg)`
    dist       torchrun data parallelism (DDP)
    common     the shared loop, checkpoints, logs, validation
    synthetic  a tiny ID-group dataset and preference pairs from the bundled astronaut image (configs/data)
    cli        `anyid-rt train sft|dpo CONFIG` (also `python -m anyid_rt.trainer.cli`)

Importing this package imports nothing heavy; import the submodules you need.
"""
