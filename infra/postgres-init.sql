-- One Postgres for both servers: a database (and owner) each. Runs once, on an empty volume.
CREATE USER mlflow WITH PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
CREATE USER prefect WITH PASSWORD 'prefect';
CREATE DATABASE prefect OWNER prefect;
