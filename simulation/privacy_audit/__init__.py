"""`bouquet privacy-audit`: membership inference, extraction, gate and profile attacks on what sharers release,
against the share ratio and the ε of DP-SGD, beside Per-Pcs's utility (simulation.privacy_audit.run)."""
