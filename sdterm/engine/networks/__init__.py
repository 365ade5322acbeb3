"""The networks of SD v1: U-Net, VAE (KL-f8) and the CLIP text encoder, with module trees named after
the original checkpoint keys, so loading is one strict ``load_state_dict`` with no renaming table."""
