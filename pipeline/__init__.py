"""One GPU, no Ray: I2VGen-XL image-to-video generation.

Public surface (each module is small and named for what it holds):

- `request`:     `GenerationParams`, `parse_params`, presets, `output_size` (resolution -> WxH)
- `images`:      `load_image` / `load_image_file` (validated, normalized RGB input)
- `loading`:     `load_model` (tiny-random, a diffusers directory, or a cached hub id)
- `generator`:   `Generator` (the denoising loop, progress + cancellation), `MemoryOptions`
- `video`:       `encode_mp4` (H.264, yuv420p, faststart) and output names
- `render`:      `render` (image -> MP4 + params.json), what a worker runs per job
- `cost_model`:  `estimate` (peak VRAM and seconds of a request on a GPU)
- `errors`:      the errors a user can act on (code, message, field, HTTP status)

This package imports nothing from `serving`, `cluster` or `monitoring`.
"""
