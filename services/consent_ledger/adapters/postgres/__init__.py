"""PostgreSQL: migrations, named queries and the stores built on them."""
