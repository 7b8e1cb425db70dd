"""Sample quality: FID (pytorch-fid Inception), the offline fid_c10, and time-to-target."""
