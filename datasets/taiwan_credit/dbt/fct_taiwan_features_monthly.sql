-- Taiwan clients' features as of each statement month, from that month and earlier ones only.
with

statements as (
    select * from {{ ref('int_taiwan_statements_unpivoted') }}
),

windowed as (
    select
        client_id,
        statement_month,
        limit_bal,
        repayment_status,
        bill_amount,
        paid_amount,
        bill_amount / nullif(limit_bal, 0) as utilisation,
        max(repayment_status) over last_3_months as max_delay_3m,
        avg(bill_amount) over last_3_months as avg_bill_3m,
        avg(paid_amount) over last_3_months as avg_paid_3m,
        sum(cast(repayment_status > 0 as integer)) over months_so_far as months_delayed_6m
    from statements
    window
        last_3_months as (
            partition by client_id order by statement_month
            rows between 2 preceding and current row
        ),
        months_so_far as (
            partition by client_id order by statement_month
            rows between unbounded preceding and current row
        )
),

final as (
    select
        client_id,
        statement_month,
        cast(statement_month as timestamptz) as event_timestamp,
        cast(now() as timestamptz) as created_timestamp,
        cast(limit_bal as double) as limit_bal,
        cast(repayment_status as double) as repayment_status,
        cast(bill_amount as double) as bill_amount,
        cast(paid_amount as double) as paid_amount,
        cast(utilisation as double) as utilisation,
        cast(max_delay_3m as double) as max_delay_3m,
        cast(avg_bill_3m as double) as avg_bill_3m,
        cast(avg_paid_3m as double) as avg_paid_3m,
        cast(months_delayed_6m as double) as months_delayed_6m
    from windowed
)

select * from final
