"""Try a model: `nano chat` in the terminal and `nano serve`, a local web page, both on the LiteRT-LM engine a phone
runs (serve.engines), the page beside the model it was distilled from (serve.app, serve/static)."""
