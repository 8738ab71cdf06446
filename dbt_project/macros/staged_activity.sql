{#- Validated activity rows of one raw table, typed. Both activity sources (the core system's
    extract and the landing folder) deliver the same columns. -#}
{% macro staged_activity(relation, table_name, source_system) %}
    with

    source as (
        {{ clean_rows(relation, table_name) }}
    ),

    renamed as (
        select
            cast(account_id as bigint) as account_id,
            cast(activity_date as date) as activity_date,
            cast(n_transactions as integer) as n_transactions,
            cast(spend_amount as double) as spend_amount,
            cast(payment_amount as double) as payment_amount,
            cast(balance as double) as balance,
            cast(missed_payment as boolean) as missed_payment,
            channel,
            _loaded_at as loaded_at,
            '{{ source_system }}' as source_system
        from source
    )

    select * from renamed
{% endmacro %}
