"""A bundle's module: ``python -m node submit --bundle examples/myjob mymod:work`` calls
``work`` once per input line, in a worker process on some node of the mesh."""


def work(x: int) -> dict[str, int]:
    return {"x": x, "square": x * x}
