"""The backend under every front end: `cpu` (kernel choice, the step's calls) over `layout`
(pointer and chunk tables, packing). Imports `fastrms.core` and `fastrms.kernels`."""
