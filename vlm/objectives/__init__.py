"""Training objectives, one file each: import from the submodules (registry, configs, clip_infonce, ...)."""
