"""fedquic."""
