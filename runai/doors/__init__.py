"""Front doors: each turns its wire format into core requests, and core events back into
its wire format. :mod:`runai.doors.legacy` is the original runai socket protocol."""
