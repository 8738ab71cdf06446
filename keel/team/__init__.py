"""The team profile's services: Dagster's Postgres database, Celery workers on RabbitMQ."""
