"""One callout, start to finish: its arguments checked, its permit held, one HTTP attempt under a
hard deadline, the reply classified, the outcome recorded once."""
