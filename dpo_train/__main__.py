from .cli import app

app(prog_name="dpo-train")
