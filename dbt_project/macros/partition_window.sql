{#- Restrict a date column to the partition range Dagster passes as vars, widened by
    `lookback_days` into the past for rolling windows. Without vars, every day qualifies. -#}
{% macro in_partition_window(column, lookback_days=0) %}
    {%- if var('start_date') -%}
        {{ column }} between
            cast('{{ var("start_date") }}' as date) - interval {{ lookback_days }} day
            and cast('{{ var("end_date") or var("start_date") }}' as date)
    {%- else -%}
        true
    {%- endif -%}
{% endmacro %}
