"""HTML reports with PNG images: attribution side by side, bias figures, audits."""
