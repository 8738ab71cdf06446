{#- No two rows share the same values in `columns` (a composite primary key).

    With `window_column`, a run given a partition range (vars start_date/end_date) checks only
    the keys of the rows in that range, but against the whole table: a day's new rows may not
    repeat a key that an earlier day already stored. Without vars, every key is checked. -#}
{% test unique_combination_of_columns(model, columns, window_column=none) %}
    {%- set key = columns | join(', ') -%}
    {%- if window_column and var('start_date') %}
    with added as (
        select distinct {{ key }}
        from {{ model }}
        where {{ window_column }} between cast('{{ var("start_date") }}' as date)
            and cast('{{ var("end_date") or var("start_date") }}' as date)
    )

    select {{ key }}, count(*) as copies
    from {{ model }}
    inner join added using ({{ key }})
    group by {{ key }}
    having count(*) > 1
    {%- else %}
    select {{ key }}, count(*) as copies
    from {{ model }}
    group by {{ key }}
    having count(*) > 1
    {%- endif %}
{% endtest %}
