"""The engine format as both sides use it: one loader per backend, the AOTInductor graph cache and C ABI,
and the checks an engine must pass (the trainer runs them before publishing, the server before serving)."""
